//! Float layers that own their weights (`alloc`): made in code, by a
//! converter, or by converting the weight type (f32 -> f16).
//!
//! ```
//! use micromoe::kernels::Activation;
//! use micromoe::moe::owned::{ExpertBuf, MoeBuf};
//! use micromoe::Rule;
//! // 2 experts, in = out = 2, hidden 3, gated SiLU; all weights 0.1.
//! let expert = ExpertBuf::gated(vec![0.1f32; 6], vec![0.1; 6], vec![0.1; 6], 2, 3, 2, Activation::Silu);
//! let f32_layer = MoeBuf::new(vec![0.5, -0.5, -0.5, 0.5], vec![expert.clone(), expert], Rule::mixtral(2, 1));
//! let f16_layer = f32_layer.convert(micromoe::quant::f16::from_f32);
//! let experts = f16_layer.expert_views().unwrap();
//! let layer = f16_layer.layer(&experts).unwrap();
//! let mut scratch = vec![0u8; layer.scratch_bytes()];
//! let mut y = [0.0f32; 2];
//! let sel = layer.infer(&[1.0, 0.0], &mut y, &mut scratch).unwrap();
//! assert_eq!(sel[0].expert, 0);
//! ```

use alloc::vec::Vec;

use super::{MoeLayer, SharedExpert};
use crate::error::Result;
use crate::expert::Expert;
use crate::kernels::{Activation, FloatWeight, Linear};
use crate::router::{Router, Rule};

/// One expert's weights, row-major `(out, in)` each.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBuf<W> {
    /// `up` (Mixtral `w3`), `(hidden, in)`.
    pub up: Vec<W>,
    /// Gated units: `gate` (Mixtral `w1`), `(hidden, in)`.
    pub gate: Option<Vec<W>>,
    /// `down` (Mixtral `w2`), `(out, hidden)`.
    pub down: Vec<W>,
    /// Input width.
    pub in_dim: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Output width.
    pub out_dim: usize,
    /// Non-linearity.
    pub act: Activation,
}

impl<W: FloatWeight> ExpertBuf<W> {
    /// `down(act(up x))`.
    pub fn mlp(
        up: Vec<W>,
        down: Vec<W>,
        in_dim: usize,
        hidden: usize,
        out_dim: usize,
        act: Activation,
    ) -> Self {
        ExpertBuf {
            up,
            gate: None,
            down,
            in_dim,
            hidden,
            out_dim,
            act,
        }
    }

    /// `down(act(gate x) * up x)`.
    #[allow(clippy::too_many_arguments)]
    pub fn gated(
        gate: Vec<W>,
        up: Vec<W>,
        down: Vec<W>,
        in_dim: usize,
        hidden: usize,
        out_dim: usize,
        act: Activation,
    ) -> Self {
        ExpertBuf {
            up,
            gate: Some(gate),
            down,
            in_dim,
            hidden,
            out_dim,
            act,
        }
    }

    /// The borrowed expert, validated.
    pub fn view(&self) -> Result<Expert<'_, W>> {
        let up = Linear::new(&self.up, None, self.hidden, self.in_dim)?;
        let down = Linear::new(&self.down, None, self.out_dim, self.hidden)?;
        match &self.gate {
            None => Expert::mlp(up, down, self.act),
            Some(g) => Expert::gated(
                Linear::new(g, None, self.hidden, self.in_dim)?,
                up,
                down,
                self.act,
            ),
        }
    }

    /// The same expert with every weight converted by `f`.
    pub fn convert<V: FloatWeight>(&self, f: impl Fn(W) -> V + Copy) -> ExpertBuf<V> {
        let c = |v: &Vec<W>| v.iter().map(|&w| f(w)).collect();
        ExpertBuf {
            up: c(&self.up),
            gate: self.gate.as_ref().map(c),
            down: c(&self.down),
            in_dim: self.in_dim,
            hidden: self.hidden,
            out_dim: self.out_dim,
            act: self.act,
        }
    }
}

/// A float MoE layer that owns its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeBuf<W> {
    /// Gate, `(experts, in)`.
    pub gate: Vec<W>,
    /// Routed experts.
    pub experts: Vec<ExpertBuf<W>>,
    /// Shared expert and its `(1, in)` gate.
    pub shared: Option<(ExpertBuf<W>, Option<Vec<W>>)>,
    /// Routing rule.
    pub rule: Rule,
    /// Selection bias.
    pub bias: Option<Vec<f32>>,
    /// Routed scaling factor.
    pub scaling: f32,
}

impl<W: FloatWeight> MoeBuf<W> {
    /// A layer without shared expert, selection bias or scaling.
    pub fn new(gate: Vec<W>, experts: Vec<ExpertBuf<W>>, rule: Rule) -> Self {
        MoeBuf {
            gate,
            experts,
            shared: None,
            rule,
            bias: None,
            scaling: 1.0,
        }
    }

    /// Views of the routed experts, for [`MoeBuf::layer`].
    pub fn expert_views(&self) -> Result<Vec<Expert<'_, W>>> {
        self.experts.iter().map(|e| e.view()).collect()
    }

    /// The runnable layer over `experts` (from [`MoeBuf::expert_views`]).
    pub fn layer<'a>(&'a self, experts: &'a [Expert<'a, W>]) -> Result<MoeLayer<'a, W, W>> {
        let in_dim = self.experts.first().map_or(0, |e| e.in_dim);
        let gate = Linear::new(&self.gate, None, self.rule.experts, in_dim)?;
        let shared = match &self.shared {
            Some((e, g)) => Some(SharedExpert {
                expert: e.view()?,
                gate: g
                    .as_ref()
                    .map(|g| Linear::new(g, None, 1, in_dim))
                    .transpose()?,
            }),
            None => None,
        };
        let router = Router::new(self.rule, self.bias.as_deref(), self.scaling)?;
        MoeLayer::new(gate, router, experts, shared)
    }

    /// The same layer with every weight converted by `f` (e.g. to f16).
    pub fn convert<V: FloatWeight>(&self, f: impl Fn(W) -> V + Copy) -> MoeBuf<V> {
        MoeBuf {
            gate: self.gate.iter().map(|&w| f(w)).collect(),
            experts: self.experts.iter().map(|e| e.convert(f)).collect(),
            shared: self.shared.as_ref().map(|(e, g)| {
                (
                    e.convert(f),
                    g.as_ref().map(|g| g.iter().map(|&w| f(w)).collect()),
                )
            }),
            rule: self.rule,
            bias: self.bias.clone(),
            scaling: self.scaling,
        }
    }

    /// Bytes of weight storage (gate, experts, shared).
    pub fn weight_bytes(&self) -> usize {
        let e = |x: &ExpertBuf<W>| x.up.len() + x.down.len() + x.gate.as_ref().map_or(0, Vec::len);
        let n = self.gate.len()
            + self.experts.iter().map(e).sum::<usize>()
            + self
                .shared
                .as_ref()
                .map_or(0, |(x, g)| e(x) + g.as_ref().map_or(0, Vec::len));
        n * core::mem::size_of::<W>()
    }
}
