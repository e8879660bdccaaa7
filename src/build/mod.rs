//! Owned layers and post-training quantization (`alloc`): what the host
//! builds before writing a model, kept apart from the `no_std` numerics and
//! graphs that run it.
//!
//! - [`LinearBuf`], [`ExpertBuf`], [`MoeBuf`]: float layers in owned
//!   buffers (f32, or converted to f16), with borrowed views for inference;
//! - [`QLinearBuf`], [`QExpertBuf`], [`QMoeBuf`]: the same quantized to
//!   int8 or Q15 from calibration inputs (per-row symmetric weights, per-
//!   tensor activations), bit-exact with TFLite Micro's integer kernels;
//! - [`act_params`], [`mul_params`]: the quantization parameters they use.

mod layer;
mod linear;
mod owned;

pub use layer::{FloatGateBuf, FloatWeights, QExpertBuf, QMoeBuf};
pub use linear::{QLinearBuf, act_params, mul_params};
pub use owned::{ExpertBuf, LinearBuf, MoeBuf};
