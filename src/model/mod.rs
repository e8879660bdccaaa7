//! Model graphs built from a parsed container. The stack of MoE layers and
//! multi-gate MoE run through [`Model::infer`](crate::Model::infer); this
//! module holds the decoder language model (architecture 3): token
//! embedding, RMSNorm, rotary position embeddings, grouped-query attention
//! over a static KV cache, SwiGLU experts routed by the crate's
//! [`Router`](crate::Router) (Mixtral, Qwen2-MoE with shared expert and dense
//! layers), tied or untied output, and sampling.
//!
//! Weights may be f32, f16 or int8 per tensor (int8: symmetric per row,
//! the input vector quantized to int8 per product, `i32` sums); norms,
//! biases and the attention arithmetic are f32. Rust does not fuse
//! multiplies into adds and `libm` is software, so every target computes
//! the same bits.
//!
//! ```
//! # #[cfg(feature = "std")] {
//! use micromoe::model::{Decoder, Sampler};
//! # let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders/mixtral_tied");
//! # let bytes = micromoe::host::convert(&dir, micromoe::host::Dtype::F32, None, None).unwrap();
//! # let bytes = micromoe::format::write::AlignedBytes::from(&bytes[..]);
//! let decoder = Decoder::parse(&bytes).unwrap();
//! let mut buf = vec![0u8; decoder.state_bytes()];
//! let mut state = decoder.state(&mut buf).unwrap();
//! let mut logits = vec![0.0; decoder.config().vocab];
//! let mut sampler = Sampler::greedy();
//! let mut token = 1;
//! for _ in 0..4 {
//!     decoder.step(&mut state, token, &mut logits, |_layer, _experts| {}).unwrap();
//!     token = sampler.sample(&mut logits, &mut []).unwrap();
//! }
//! assert_eq!(state.pos(), 4);
//! # }
//! ```

mod decoder;
mod layers;
mod matrix;
mod sample;
mod stack;
mod state;
#[cfg(feature = "alloc")]
pub mod write;

pub use decoder::{Config, Decoder, LayerConfig, MAX_EXPERTS, MAX_WIDTH, ResolvedDecoder};
#[cfg(feature = "cuda")]
pub(crate) use decoder::{rope_inv_freq, rope_table};
pub use layers::{Experts, FloatExperts, IntExperts, IntLayer, IntPath, IntShared, Layer};
pub use matrix::{INT8_GROUP_MULTIPLE, Input, MAX_INT8_COLS, Matrix, Weights, quantize_vector};
pub use sample::{Rng, Sampler};
pub use stack::{LayerInfo, Model, Resolved, Step, argmax, required_scratch, required_scratch_int};
pub use state::{State, bytes_for_dims};

/// Fills `layers` with `n` views made by `make` in order, each pushed where
/// it is made ([`Resolved`], [`ResolvedDecoder`]); `TooManyLayers` if `n`
/// is past the capacity `L`.
#[inline(always)]
fn build_layers<T, const L: usize>(
    layers: &mut heapless::Vec<T, L>,
    n: usize,
    mut make: impl FnMut(usize) -> crate::Result<T>,
) -> crate::Result<()> {
    layers.clear();
    if n > L {
        return Err(crate::Error::TooManyLayers { layers: n, capacity: L });
    }
    for l in 0..n {
        // Cannot fail: n <= L.
        let _ = layers.push(make(l)?);
    }
    Ok(())
}
