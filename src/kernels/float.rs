//! f32 and f16 weights, f32 activations and accumulation.

use crate::error::{Error, Result, What, check_len, mul};
use crate::quant::f16;

/// A weight element that widens to f32: `f32` or [`f16`](struct@f16).
pub trait FloatWeight: Copy + bytemuck::Pod + 'static {
    /// The weight as f32.
    fn to_f32(self) -> f32;
}

impl FloatWeight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatWeight for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// `y = W x + b`: `w` is `(y.len(), x.len())` row-major, `b` (if any) has
/// `y.len()` elements. Rows beyond `w` (or bias beyond `b`) are not written
/// (or not added); it never panics.
// w: (out, in) @ x: (in,) -> y: (out,)
pub fn matvec<W: FloatWeight>(w: &[W], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) {
    if x.is_empty() {
        y.iter_mut().for_each(|v| *v = 0.0);
    } else {
        for (yo, row) in y.iter_mut().zip(w.chunks_exact(x.len())) {
            *yo = row.iter().zip(x).map(|(&wi, &xi)| wi.to_f32() * xi).sum();
        }
    }
    if let Some(b) = b {
        for (yo, &bo) in y.iter_mut().zip(b) {
            *yo += bo;
        }
    }
}

/// A borrowed fully-connected layer with f32 or f16 weights.
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a, W> {
    w: &'a [W],
    bias: Option<&'a [f32]>,
    rows: usize,
    cols: usize,
}

impl<'a, W: FloatWeight> Linear<'a, W> {
    /// `w`: `(rows, cols)` row-major; `bias`: `rows` elements.
    pub fn new(w: &'a [W], bias: Option<&'a [f32]>, rows: usize, cols: usize) -> Result<Self> {
        check_len(What::Weight, mul(rows, cols)?, w.len())?;
        if let Some(b) = bias {
            check_len(What::Bias, rows, b.len())?;
        }
        if rows == 0 || cols == 0 {
            return Err(Error::Shape { what: What::Weight, expected: 1, actual: 0 });
        }
        Ok(Linear { w, bias, rows, cols })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weights, `(rows, cols)` row-major.
    pub fn weights(&self) -> &'a [W] {
        self.w
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&'a [f32]> {
        self.bias
    }

    /// `y = W x + b`. `x` must have `cols` and `y` `rows` elements (callers
    /// check once per layer; a mismatch computes garbage, never panics).
    #[inline]
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        matvec(self.w, self.bias, x, y)
    }
}

/// Element-wise non-linearity of an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU, `x * Phi(x)` (PyTorch `gelu`, HF `"gelu"`).
    Gelu,
    /// Tanh-approximated GELU (HF `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// `x * sigmoid(x)` (HF `"silu"`), SwiGLU's gate.
    Silu,
}

impl Activation {
    /// The function at `x`.
    #[inline]
    pub fn eval(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                const C: f32 = 0.797_884_6; // sqrt(2 / pi)
                0.5 * x * (1.0 + libm::tanhf(C * (x + 0.044_715 * x * x * x)))
            }
            Activation::Silu => x / (1.0 + libm::expf(-x)),
        }
    }

    /// Largest slope of the function, used in error analysis.
    pub fn lipschitz(self) -> f32 {
        match self {
            Activation::Relu => 1.0,
            Activation::Gelu | Activation::GeluTanh => 1.13,
            Activation::Silu => 1.1,
        }
    }

    /// Applies the function in place.
    pub fn apply(self, xs: &mut [f32]) {
        for x in xs {
            *x = self.eval(*x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_weights_widen() {
        let w = [f16::from_f32(0.5), f16::from_f32(-2.0)];
        let lin = Linear::new(&w, None, 1, 2).unwrap();
        let mut y = [0.0];
        lin.forward(&[4.0, 1.0], &mut y);
        assert_eq!(y, [0.0]);
    }

    #[test]
    fn shapes_are_checked() {
        assert!(Linear::new(&[0.0f32; 5], None, 2, 3).is_err());
        assert!(Linear::new(&[0.0f32; 6], Some(&[0.0]), 2, 3).is_err());
        assert!(Linear::<f32>::new(&[], None, 0, 3).is_err());
        assert_eq!(Linear::new(&[0.0f32; 6], None, usize::MAX, 2).unwrap_err(), Error::Overflow);
    }

    #[test]
    fn activations_at_known_points() {
        assert_eq!(Activation::Relu.eval(-1.0), 0.0);
        assert!((Activation::Silu.eval(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((Activation::Gelu.eval(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((Activation::GeluTanh.eval(1.0) - 0.841_192).abs() < 1e-5);
    }
}
