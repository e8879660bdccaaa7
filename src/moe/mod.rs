//! The MoE layer: router + experts + combine.
//!
//! For each token the gate computes one logit per expert, the router picks k
//! experts and their weights, only those k experts run, and the output is
//! `sum_i w_i * expert_i(x)`, plus an always-on shared expert scaled by
//! `sigmoid(shared_gate x)` (Qwen2-MoE) or by 1 (DeepSeek).
//!
//! [`MoeLayer`] runs f32/f16 weights in f32; [`QMoeLayer`] runs int8 or Q15
//! end to end in integers, including the router. Both work in a
//! caller-provided scratch buffer of `scratch_bytes()` bytes. The float
//! token path (gate, route, combine, shared expert) is written once and
//! also runs the decoder's FFN ([`Decoder`](crate::model::Decoder)).
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
pub(crate) mod batch;

pub use float::{MoeLayer, SharedExpert};
pub(crate) use int::Gate;
pub use int::{Combine, FloatGate, QMoeLayer, QSharedExpert, SharedSource};
pub(crate) use int::{check_expert, check_parts, check_shared};
pub use source::ExpertSource;

use crate::error::{Error, Result};
use crate::router::{Choice, Router, Selection, sigmoid};

/// One MoE layer's parts as [`forward`] runs them on the float path: the
/// stack's [`MoeLayer`] and the decoder's FFN. `X` is the layer input as
/// its products read it (a slice; the decoder's
/// [`Input`](crate::model::Input), quantized once for all its int8
/// products), `B` an expert's work space.
pub(crate) trait Parts<X, B: ?Sized> {
    /// The gate's logits, one per routed expert.
    fn logits(&self, x: &mut X, logits: &mut [f32]);

    /// Routed expert `e` into `y`, or why it cannot be had: the token's
    /// error, never a skipped expert.
    fn expert(&self, e: usize, x: &mut X, y: &mut [f32], work: &mut B) -> Result<()>;

    /// The shared expert into `y` and its gate's logit: `None` without a
    /// shared expert, `Some(None)` to add it unscaled (DeepSeek),
    /// `Some(Some(l))` to scale it by `sigmoid(l)` (Qwen2-MoE).
    fn shared(&self, x: &mut X, y: &mut [f32], work: &mut B) -> Option<Option<f32>>;
}

/// One token through a float MoE layer, the one combine of every float
/// graph: `out = sum_i w_i expert_i(x)` over the experts `router` picks
/// from the gate's logits (in router order), then `out += g shared(x)`.
/// `router: None` is a dense layer (the shared expert alone, a decoder's
/// dense FFN). `logits` holds one value per routed expert and `y` one
/// output (callers size both).
#[inline(always)]
pub(crate) fn forward<X, B: ?Sized>(
    parts: &impl Parts<X, B>,
    router: Option<&Router<'_>>,
    x: &mut X,
    out: &mut [f32],
    (logits, y): (&mut [f32], &mut [f32]),
    work: &mut B,
) -> Result<Selection<f32>> {
    let mut sel = Selection::new();
    out.fill(0.0);
    if let Some(router) = router {
        // logits: (experts,) = gate (experts, in) @ x
        parts.logits(x, logits);
        router.route(logits, &mut sel)?;
        for c in &sel {
            parts.expert(c.expert as usize, x, y, work)?;
            for (o, &v) in out.iter_mut().zip(y.iter()) {
                *o += c.weight * v;
            }
        }
    }
    add_shared(parts, x, out, y, work);
    Ok(sel)
}

/// `out += g shared(x)`: `g = sigmoid(shared_gate x)`, or 1 for an
/// ungated shared expert; nothing without one. `y` is work space.
#[inline(always)]
pub(crate) fn add_shared<X, B: ?Sized>(
    parts: &impl Parts<X, B>,
    x: &mut X,
    out: &mut [f32],
    y: &mut [f32],
    work: &mut B,
) {
    let Some(logit) = parts.shared(x, y, work) else { return };
    let g = logit.map_or(1.0, sigmoid);
    for (o, &v) in out.iter_mut().zip(y.iter()) {
        *o += g * v;
    }
}

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
