//! The MoE layer: router + experts + combine.
//!
//! For each token the gate computes one logit per expert, the router picks k
//! experts and their weights, only those k experts run, and the output is
//! `sum_i w_i * expert_i(x)`, plus an always-on shared expert scaled by
//! `sigmoid(shared_gate x)` (Qwen2-MoE) or by 1 (DeepSeek).
//!
//! [`MoeLayer`] runs f32/f16 weights in f32; [`QMoeLayer`] runs int8 or Q15
//! end to end in integers, including the router. Both work in a
//! caller-provided scratch buffer of `scratch_bytes()` bytes.
//!
//! ```
//! use micromoe::expert::Expert;
//! use micromoe::kernels::{Activation, Linear};
//! use micromoe::{MoeLayer, Router, Rule, Stats};
//! // Two experts on 1-d input: expert 0 doubles, expert 1 negates.
//! let gate = Linear::new(&[1.0f32, -1.0], None, 2, 1).unwrap();
//! let id = [1.0f32];
//! let (two, neg) = ([2.0f32], [-1.0f32]);
//! let experts = [
//!     Expert::mlp(Linear::new(&id, None, 1, 1).unwrap(), Linear::new(&two, None, 1, 1).unwrap(), Activation::Relu).unwrap(),
//!     Expert::mlp(Linear::new(&neg, None, 1, 1).unwrap(), Linear::new(&neg, None, 1, 1).unwrap(), Activation::Relu).unwrap(),
//! ];
//! let router = Router::new(Rule::switch(2), None, 1.0).unwrap();
//! let layer = MoeLayer::new(gate, router, &experts, None).unwrap();
//! let mut scratch = vec![0u8; layer.scratch_bytes()];
//! let mut stats = Stats::<2>::new();
//! let mut y = [0.0f32];
//! let sel = layer.infer_with_stats(&[3.0], &mut y, &mut scratch, &mut stats).unwrap();
//! assert_eq!(sel[0].expert, 0); // positive input -> expert 0
//! assert_eq!(stats.counts, [1, 0]);
//! assert!(stats.macs < stats.macs_dense);
//! ```

mod float;
mod int;
mod source;

#[cfg(feature = "std")]
mod batch;

pub use float::{MoeLayer, SharedExpert};
pub(crate) use int::Gate;
pub use int::{Combine, FloatGate, QMoeLayer, QSharedExpert, SharedSource};
pub(crate) use int::{check_expert, check_parts, check_shared};
pub use source::ExpertSource;

use crate::error::{Error, Result};
use crate::router::Choice;

/// Sizes a layer derives from its experts. The public constructors compute
/// them by visiting (and checking) every expert; a parsed model knows them
/// from its layer records and skips that walk on every inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    /// Output width.
    pub out_dim: usize,
    /// Largest hidden buffer an expert needs (both halves of a gated one).
    pub hidden_max: usize,
    /// Multiply-accumulates of all routed experts together.
    pub macs_experts: u64,
}

/// What a layer did: how often each expert was chosen and how much work was
/// done against the dense equivalent (every expert on every token).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats<const N: usize> {
    /// Tokens processed.
    pub tokens: u32,
    /// Times each expert was chosen.
    pub counts: [u32; N],
    /// Multiply-accumulates done (gate, chosen experts, shared expert).
    pub macs: u64,
    /// Multiply-accumulates the same layer would do with all experts active.
    pub macs_dense: u64,
}

impl<const N: usize> Stats<N> {
    /// Empty statistics for up to `N` experts.
    pub const fn new() -> Self {
        Stats { tokens: 0, counts: [0; N], macs: 0, macs_dense: 0 }
    }

    fn check(&self, experts: usize) -> Result<()> {
        if experts > N { Err(Error::StatsTooSmall { experts, capacity: N }) } else { Ok(()) }
    }

    fn record<W>(&mut self, sel: &[Choice<W>], macs: u64, macs_dense: u64) {
        self.tokens = self.tokens.saturating_add(1);
        for c in sel {
            if let Some(n) = self.counts.get_mut(c.expert as usize) {
                *n = n.saturating_add(1);
            }
        }
        self.macs = self.macs.saturating_add(macs);
        self.macs_dense = self.macs_dense.saturating_add(macs_dense);
    }
}

impl<const N: usize> Default for Stats<N> {
    fn default() -> Self {
        Self::new()
    }
}
