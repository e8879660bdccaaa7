//! Float layers that own their weights (`alloc`): made in code, by a
//! converter, or by converting the weight type (f32 -> f16).
//!
//! ```
//! use micromoe::kernels::Activation;
//! use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
//! use micromoe::Rule;
//! // 2 experts, in = out = 2, hidden 3, gated SiLU; all weights 0.1.
//! let lin = |rows, cols| LinearBuf::new(vec![0.1f32; rows * cols], None, rows, cols);
//! let expert = ExpertBuf::gated(lin(3, 2), lin(3, 2), lin(2, 3), Activation::Silu);
//! let gate = LinearBuf::new(vec![0.5, -0.5, -0.5, 0.5], None, 2, 2);
//! let f32_layer = MoeBuf::new(gate, vec![expert.clone(), expert], Rule::mixtral(2, 1));
//! let f16_layer = f32_layer.convert(micromoe::quant::f16::from_f32);
//! let experts = f16_layer.expert_views().unwrap();
//! let layer = f16_layer.layer(&experts).unwrap();
//! let mut scratch = vec![0u8; layer.scratch_bytes()];
//! let mut y = [0.0f32; 2];
//! let sel = layer.infer(&[1.0, 0.0], &mut y, &mut scratch).unwrap();
//! assert_eq!(sel[0].expert, 0);
//! ```

use alloc::vec::Vec;

use crate::error::Result;
use crate::expert::Expert;
use crate::kernels::{Activation, FloatWeight, Linear};
use crate::moe::{MoeLayer, SharedExpert};
use crate::router::{Router, Rule};

/// A fully-connected layer's weights, `(rows, cols)` row-major, and bias.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearBuf<W> {
    /// `(rows, cols)` row-major.
    pub weights: Vec<W>,
    /// `rows` values, if any.
    pub bias: Option<Vec<f32>>,
    /// Output width.
    pub rows: usize,
    /// Input width.
    pub cols: usize,
}

impl<W: FloatWeight> LinearBuf<W> {
    /// Collects the parts; [`LinearBuf::view`] checks them.
    pub fn new(weights: Vec<W>, bias: Option<Vec<f32>>, rows: usize, cols: usize) -> Self {
        LinearBuf { weights, bias, rows, cols }
    }

    /// The borrowed layer, validated.
    pub fn view(&self) -> Result<Linear<'_, W>> {
        Linear::new(&self.weights, self.bias.as_deref(), self.rows, self.cols)
    }

    /// The same layer with every weight converted by `f` (the bias stays f32).
    pub fn convert<V: FloatWeight>(&self, f: impl Fn(W) -> V) -> LinearBuf<V> {
        LinearBuf {
            weights: self.weights.iter().map(|&w| f(w)).collect(),
            bias: self.bias.clone(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.weights.len() * core::mem::size_of::<W>() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// One expert's layers.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBuf<W> {
    /// `up` (Mixtral `w3`), `(hidden, in)`.
    pub up: LinearBuf<W>,
    /// Gated units: `gate` (Mixtral `w1`), `(hidden, in)`.
    pub gate: Option<LinearBuf<W>>,
    /// `down` (Mixtral `w2`), `(out, hidden)`.
    pub down: LinearBuf<W>,
    /// Non-linearity.
    pub act: Activation,
}

impl<W: FloatWeight> ExpertBuf<W> {
    /// `down(act(up x))`.
    pub fn mlp(up: LinearBuf<W>, down: LinearBuf<W>, act: Activation) -> Self {
        ExpertBuf { up, gate: None, down, act }
    }

    /// `down(act(gate x) * up x)`.
    pub fn gated(gate: LinearBuf<W>, up: LinearBuf<W>, down: LinearBuf<W>, act: Activation) -> Self {
        ExpertBuf { up, gate: Some(gate), down, act }
    }

    /// The borrowed expert, validated.
    pub fn view(&self) -> Result<Expert<'_, W>> {
        let (up, down) = (self.up.view()?, self.down.view()?);
        match &self.gate {
            None => Expert::mlp(up, down, self.act),
            Some(g) => Expert::gated(g.view()?, up, down, self.act),
        }
    }

    /// The same expert with every weight converted by `f`.
    pub fn convert<V: FloatWeight>(&self, f: impl Fn(W) -> V + Copy) -> ExpertBuf<V> {
        ExpertBuf {
            up: self.up.convert(f),
            gate: self.gate.as_ref().map(|g| g.convert(f)),
            down: self.down.convert(f),
            act: self.act,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.up.bytes() + self.down.bytes() + self.gate.as_ref().map_or(0, LinearBuf::bytes)
    }
}

/// A float MoE layer that owns its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeBuf<W> {
    /// Gate, `(experts, in)`.
    pub gate: LinearBuf<W>,
    /// Routed experts.
    pub experts: Vec<ExpertBuf<W>>,
    /// Shared expert and its `(1, in)` gate.
    pub shared: Option<(ExpertBuf<W>, Option<LinearBuf<W>>)>,
    /// Routing rule.
    pub rule: Rule,
    /// Selection bias.
    pub bias: Option<Vec<f32>>,
    /// Routed scaling factor.
    pub scaling: f32,
}

impl<W: FloatWeight> MoeBuf<W> {
    /// A layer without shared expert, selection bias or scaling.
    pub fn new(gate: LinearBuf<W>, experts: Vec<ExpertBuf<W>>, rule: Rule) -> Self {
        MoeBuf { gate, experts, shared: None, rule, bias: None, scaling: 1.0 }
    }

    /// Views of the routed experts, for [`MoeBuf::layer`].
    pub fn expert_views(&self) -> Result<Vec<Expert<'_, W>>> {
        self.experts.iter().map(|e| e.view()).collect()
    }

    /// The runnable layer over `experts` (from [`MoeBuf::expert_views`]).
    pub fn layer<'a>(&'a self, experts: &'a [Expert<'a, W>]) -> Result<MoeLayer<'a, W, W>> {
        let shared = match &self.shared {
            Some((e, g)) => {
                Some(SharedExpert { expert: e.view()?, gate: g.as_ref().map(|g| g.view()).transpose()? })
            }
            None => None,
        };
        let router = Router::new(self.rule, self.bias.as_deref(), self.scaling)?;
        MoeLayer::new(self.gate.view()?, router, experts, shared)
    }

    /// The same layer with every weight converted by `f` (e.g. to f16).
    pub fn convert<V: FloatWeight>(&self, f: impl Fn(W) -> V + Copy) -> MoeBuf<V> {
        MoeBuf {
            gate: self.gate.convert(f),
            experts: self.experts.iter().map(|e| e.convert(f)).collect(),
            shared: self.shared.as_ref().map(|(e, g)| (e.convert(f), g.as_ref().map(|g| g.convert(f)))),
            rule: self.rule,
            bias: self.bias.clone(),
            scaling: self.scaling,
        }
    }

    /// Bytes of weights and biases (gate, experts, shared).
    pub fn weight_bytes(&self) -> usize {
        self.gate.bytes()
            + self.experts.iter().map(ExpertBuf::bytes).sum::<usize>()
            + self.shared.as_ref().map_or(0, |(e, g)| e.bytes() + g.as_ref().map_or(0, LinearBuf::bytes))
    }
}
