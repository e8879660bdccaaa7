//! Matrix-vector kernels, one per numeric type: `y = W x + b`, with `W`
//! row-major `(out, in)` as PyTorch's `nn.Linear` stores it.
//!
//! The portable kernels are safe, allocation-free, and written so that the
//! compiler removes bounds checks (`chunks_exact`, `zip`); they stay
//! available as [`reference`](mod@reference). On Cortex-M4/M7 (`thumbv7em`) the int8 and
//! Q15 kernels take the Arm DSP path (`SMLAD`, four rows per pass; module
//! `arm`, compiled only there), which the firmware under `boards/` checks
//! bit for bit against [`reference`](mod@reference) under QEMU. On x86-64 hosts (`std`)
//! the same portable code also runs compiled for AVX2 when the CPU has it
//! (detected at run time). Float dot products have one fixed order
//! ([`dot`]), so SIMD never changes a result.
//!
//! A layer's weights are borrowed ([`Linear`] for f32/f16, [`QLinear`] for
//! int8/Q15); constructors check every length once, so `forward` cannot fail.
//!
//! ```
//! use micromoe::kernels::Linear;
//! // w: (2, 3) @ x: (3,) -> (2,)
//! let w = [1.0f32, 0.0, 2.0, 0.0, 1.0, -1.0];
//! let lin = Linear::new(&w, Some(&[0.5, 0.0]), 2, 3).unwrap();
//! let mut y = [0.0; 2];
//! lin.forward(&[1.0, 2.0, 3.0], &mut y);
//! assert_eq!(y, [7.5, -1.0]);
//! ```

#[cfg(micromoe_dsp)]
mod arm;
mod expf;
mod float;
mod int;

pub(crate) use expf::exp_shifted;
pub use float::{Activation, FloatWeight, LANES, Linear, dot, matmul, matvec};
#[cfg(feature = "std")]
pub use int::for_each_dot_i8_batch;
pub use int::{
    IntKernel, MulParams, QLinear, add_group_dots_i8, expand_words, for_each_dot_i8, matvec_i8, matvec_q15,
    reference,
};
