//! Writing models as `.moe` bytes (`alloc`): stacks and multi-gate models
//! from owned layers ([`write()`]), decoders from their tensors
//! ([`DecoderSpec`]); each written model is parsed back before it is
//! returned. The container's own layout is [`format::write`](crate::format::write)'s.

use alloc::vec::Vec;

use crate::build::QLinearBuf;
use crate::build::{ExpertBuf, LinearBuf, MoeBuf};
use crate::build::{FloatWeights, QExpertBuf, QMoeBuf};
use crate::error::{Error, Field, Result};
use crate::format::layout::{LAYER_LEVEL, LayerDtype, SHARED_EXPERT, flags, layer as lw, part, role};
use crate::format::write::{Entry, Head, assemble, entry};
use crate::format::{Elem, Key, MAX_LAYERS, arch};
use crate::kernels::{Activation, IntKernel};
use crate::quant::f16;
use crate::router::{Rule, Scoring};

mod decoder;
pub use decoder::{DecoderSpec, quantize_rows};

/// What the model's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Class scores: the answer is the argmax.
    Classify = 0,
    /// Values.
    Regress = 1,
}

/// One layer to write.
#[derive(Debug, Clone)]
pub enum LayerSpec {
    /// Float weights, stored as f32 or f16 (gate and experts separately).
    Float {
        /// The layer, in f32.
        layer: MoeBuf<f32>,
        /// How to store the gate: `F32` or `F16`.
        gate: LayerDtype,
        /// How to store the experts: `F32` or `F16`.
        experts: LayerDtype,
    },
    /// An int8 layer.
    Int8(QMoeBuf<i8>),
    /// A Q15 layer.
    Q15(QMoeBuf<i16>),
}

/// A whole model to write.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Classifier or regressor.
    pub task: Task,
    /// The layers, first to last; widths must chain (within each task).
    pub layers: Vec<LayerSpec>,
    /// Multi-gate MoE: the number of tasks; the layers form that many equal
    /// chains, each from the model input. `None` for a plain stack.
    pub multi_gate: Option<usize>,
    /// Per layer, the layer whose routed experts it uses (its experts are
    /// then not written); empty: every layer its own.
    pub experts_from: Vec<usize>,
}

impl ModelSpec {
    /// A plain stack of layers, each with its own experts.
    pub fn stack(task: Task, layers: Vec<LayerSpec>) -> Self {
        ModelSpec { task, layers, multi_gate: None, experts_from: Vec::new() }
    }
}

fn key(layer: usize, expert: u16, role: u8, part: u8) -> Key {
    Key { layer: layer as u16, expert, role, part }
}

fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Silu => 3,
    }
}

/// What a layer record says of its experts.
#[derive(Clone, Copy, PartialEq)]
struct Shape {
    act: Activation,
    gated: bool,
    /// (in, hidden, out)
    dims: (usize, usize, usize),
    /// Which of up, gate and down have a bias: every routed expert of a
    /// layer must have the same tensors (inference finds them by position).
    biases: (bool, bool, bool),
}

/// The record words and flags every layer shares: widths, activation,
/// routing; checks that all routed experts have one shape and the shared
/// expert the same kind.
fn record(
    l: usize,
    rule: &Rule,
    mut experts: impl Iterator<Item = Shape>,
    shared: Option<Shape>,
) -> Result<([u32; lw::WORDS], u32)> {
    let bad = |field| Error::BadField { field, layer: l };
    let first = experts.next().ok_or(bad(Field::Routing))?;
    let kind = |s: &Shape| (s.act, s.gated, s.dims.0, s.dims.2);
    if experts.any(|s| s != first) || shared.is_some_and(|s| kind(&s) != kind(&first)) {
        return Err(bad(Field::Dims));
    }
    let mut w = [0u32; lw::WORDS];
    (w[lw::IN_DIM], w[lw::HIDDEN], w[lw::OUT_DIM]) =
        (first.dims.0 as u32, first.dims.1 as u32, first.dims.2 as u32);
    w[lw::ACT] = act_code(first.act);
    w[lw::EXPERTS] = rule.experts as u32;
    w[lw::K] = rule.k as u32;
    if let Some(g) = rule.groups {
        w[lw::N_GROUP] = g.count as u32;
        w[lw::TOPK_GROUP] = g.keep as u32;
    }
    let mut f = 0;
    if rule.normalize {
        f |= flags::NORMALIZE;
    }
    if rule.scoring == Scoring::Sigmoid {
        f |= flags::SIGMOID;
    }
    if first.gated {
        f |= flags::GATED;
    }
    Ok((w, f))
}

fn float_linear(out: &mut Vec<Entry>, k: Key, l: &LinearBuf<f32>, dtype: LayerDtype) {
    match dtype {
        LayerDtype::F16 => {
            let w: Vec<f16> = l.weights.iter().map(|&v| f16::from_f32(v)).collect();
            out.push(entry(k, l.rows, l.cols, &w, (0, 0)));
        }
        _ => out.push(entry(k, l.rows, l.cols, &l.weights, (0, 0))),
    }
    if let Some(b) = &l.bias {
        out.push(entry(Key { part: part::BIAS, ..k }, l.rows, 1, b, (0, 0)));
    }
}

fn float_expert(out: &mut Vec<Entry>, l: usize, e: u16, x: &ExpertBuf<f32>, dtype: LayerDtype) {
    float_linear(out, key(l, e, role::UP, part::WEIGHT), &x.up, dtype);
    if let Some(g) = &x.gate {
        float_linear(out, key(l, e, role::GATE_PROJ, part::WEIGHT), g, dtype);
    }
    float_linear(out, key(l, e, role::DOWN, part::WEIGHT), &x.down, dtype);
}

fn float_layer(
    out: &mut Vec<Entry>,
    (l, from): (usize, usize),
    m: &MoeBuf<f32>,
    gate: LayerDtype,
    experts: LayerDtype,
) -> Result<[u32; lw::WORDS]> {
    let bad = |field| Error::BadField { field, layer: l };
    if gate.is_int() || experts.is_int() {
        return Err(bad(Field::Dtype));
    }
    let shape = |x: &ExpertBuf<f32>| Shape {
        act: x.act,
        gated: x.gate.is_some(),
        dims: (x.up.cols, x.up.rows, x.down.rows),
        biases: (
            x.up.bias.is_some(),
            x.gate.as_ref().is_some_and(|g| g.bias.is_some()),
            x.down.bias.is_some(),
        ),
    };
    let (mut w, mut f) =
        record(l, &m.rule, m.experts.iter().map(shape), m.shared.as_ref().map(|(s, _)| shape(s)))?;
    w[lw::GATE_DTYPE] = gate as u32;
    w[lw::EXPERT_DTYPE] = experts as u32;
    w[lw::SCALING] = m.scaling.to_bits();
    w[lw::SCALING_Q15] = libm::roundf(m.scaling * 32768.0) as i32 as u32;
    float_linear(out, key(l, LAYER_LEVEL, role::GATE, part::WEIGHT), &m.gate, gate);
    if let Some(b) = &m.bias {
        f |= flags::SELECTION_BIAS;
        out.push(entry(key(l, LAYER_LEVEL, role::SELECTION_BIAS, part::WEIGHT), b.len(), 1, b, (0, 0)));
    }
    w[lw::EXPERTS_FROM] = from as u32;
    for (e, x) in m.experts.iter().enumerate().filter(|_| from == l) {
        float_expert(out, l, e as u16, x, experts);
    }
    if let Some((s, g)) = &m.shared {
        f |= flags::SHARED;
        w[lw::SHARED_HIDDEN] = s.up.rows as u32;
        float_expert(out, l, SHARED_EXPERT, s, experts);
        if let Some(g) = g {
            f |= flags::SHARED_GATE;
            float_linear(out, key(l, SHARED_EXPERT, role::SHARED_GATE, part::WEIGHT), g, experts);
        }
    }
    let any_bias = |x: &ExpertBuf<f32>| x.up.bias.is_some() || x.down.bias.is_some();
    if m.experts.iter().any(any_bias) {
        f |= flags::BIASES;
    }
    w[lw::FLAGS] = f;
    Ok(w)
}

fn int_linear<A: IntKernel>(out: &mut Vec<Entry>, k: Key, q: &QLinearBuf<A>)
where
    A::Bias: Elem,
{
    let zps = (q.input.zero_point, q.output.zero_point);
    out.push(entry(k, q.rows, q.cols, &q.weights, zps));
    if let Some(b) = &q.bias {
        out.push(entry(Key { part: part::BIAS, ..k }, q.rows, 1, b, (0, 0)));
    }
    out.push(entry(Key { part: part::MULTIPLIER, ..k }, q.rows, 1, &q.multipliers, (0, 0)));
    out.push(entry(Key { part: part::SHIFT, ..k }, q.rows, 1, &q.shifts, (0, 0)));
}

fn int_expert<A: IntKernel + Elem>(out: &mut Vec<Entry>, l: usize, e: u16, x: &QExpertBuf<A>)
where
    A::Bias: Elem,
{
    int_linear(out, key(l, e, role::UP, part::WEIGHT), &x.up);
    if let Some((g, m)) = &x.gate {
        int_linear(out, key(l, e, role::GATE_PROJ, part::WEIGHT), g);
        let p = [m.a_zp, m.b_zp, m.out_zp, m.multiplier.multiplier, m.multiplier.shift];
        out.push(entry(key(l, e, role::MUL, part::WEIGHT), 5, 1, &p, (0, 0)));
    }
    int_linear(out, key(l, e, role::DOWN, part::WEIGHT), &x.down);
    if let Some(t) = &x.lut {
        out.push(entry(key(l, e, role::LUT, part::WEIGHT), t.len(), 1, t, (0, 0)));
    }
}

fn int_layer<A: IntKernel + Elem>(
    out: &mut Vec<Entry>,
    (l, from): (usize, usize),
    q: &QMoeBuf<A>,
    dtype: LayerDtype,
) -> Result<[u32; lw::WORDS]>
where
    A::Bias: Elem,
{
    let bad = |field| Error::BadField { field, layer: l };
    let shape = |x: &QExpertBuf<A>| Shape {
        act: x.act,
        gated: x.gate.is_some(),
        dims: (x.up.cols, x.up.rows, x.down.rows),
        biases: (
            x.up.bias.is_some(),
            x.gate.as_ref().is_some_and(|g| g.0.bias.is_some()),
            x.down.bias.is_some(),
        ),
    };
    let (mut w, mut f) =
        record(l, &q.rule, q.experts.iter().map(shape), q.shared.as_ref().map(|(s, _)| shape(s)))?;
    let mut w_gate = dtype;
    w[lw::EXPERT_DTYPE] = dtype as u32;
    w[lw::SCALING] = (q.scaling_q15 as f32 / 32768.0).to_bits();
    w[lw::SCALING_Q15] = q.scaling_q15 as u32;
    w[lw::IN_SCALE] = q.input.scale.to_bits();
    w[lw::IN_ZP] = q.input.zero_point as u32;
    w[lw::OUT_SCALE] = q.output.scale.to_bits();
    w[lw::OUT_ZP] = q.output.zero_point as u32;
    w[lw::EXPERT_ZP] = q.combine.expert_zp as u32;
    w[lw::COMBINE_MULT] = q.combine.multiplier.multiplier as u32;
    w[lw::COMBINE_SHIFT] = q.combine.multiplier.shift as u32;
    if q.combine.out_zp != q.output.zero_point {
        return Err(bad(Field::Quant));
    }
    let bias_key = key(l, LAYER_LEVEL, role::SELECTION_BIAS, part::WEIGHT);
    if let Some(g) = &q.float_gate {
        // A float gate over the dequantized input routes the integer experts.
        let gate_key = key(l, LAYER_LEVEL, role::GATE, part::WEIGHT);
        match &g.weights {
            FloatWeights::F32(w) => {
                w_gate = LayerDtype::F32;
                out.push(entry(gate_key, w.rows, w.cols, &w.weights, (0, 0)));
            }
            FloatWeights::F16(w) => {
                w_gate = LayerDtype::F16;
                out.push(entry(gate_key, w.rows, w.cols, &w.weights, (0, 0)));
            }
        }
        w[lw::SCALING] = g.scaling.to_bits();
        if let Some(b) = &g.bias {
            f |= flags::SELECTION_BIAS;
            out.push(entry(bias_key, b.len(), 1, b, (0, 0)));
        }
    } else {
        int_linear(out, key(l, LAYER_LEVEL, role::GATE, part::WEIGHT), &q.gate);
        if let Some(b) = &q.bias_q15 {
            f |= flags::SELECTION_BIAS;
            out.push(entry(bias_key, b.len(), 1, b, (0, 0)));
        }
    }
    w[lw::GATE_DTYPE] = w_gate as u32;
    w[lw::EXPERTS_FROM] = from as u32;
    for (e, x) in q.experts.iter().enumerate().filter(|_| from == l) {
        int_expert(out, l, e as u16, x);
    }
    if let Some((s, g)) = &q.shared {
        f |= flags::SHARED;
        w[lw::SHARED_HIDDEN] = s.up.rows as u32;
        int_expert(out, l, SHARED_EXPERT, s);
        if let Some(g) = g {
            f |= flags::SHARED_GATE;
            int_linear(out, key(l, SHARED_EXPERT, role::SHARED_GATE, part::WEIGHT), g);
        }
    }
    if q.experts.iter().any(|x| x.up.bias.is_some() || x.down.bias.is_some()) {
        f |= flags::BIASES;
    }
    w[lw::FLAGS] = f;
    Ok(w)
}

/// Serializes `spec` (validated by parsing the result before it is returned).
pub fn write(spec: &ModelSpec) -> Result<Vec<u8>> {
    let n_layers = spec.layers.len();
    if !(1..=MAX_LAYERS).contains(&n_layers) {
        return Err(Error::BadField { field: Field::Layers, layer: 0 });
    }
    let mut entries = Vec::new();
    let mut records = Vec::with_capacity(n_layers);
    for (l, layer) in spec.layers.iter().enumerate() {
        let at = (l, spec.experts_from.get(l).copied().unwrap_or(l));
        records.push(match layer {
            LayerSpec::Float { layer, gate, experts } => {
                float_layer(&mut entries, at, layer, *gate, *experts)?
            }
            LayerSpec::Int8(q) => int_layer(&mut entries, at, q, LayerDtype::Int8)?,
            LayerSpec::Q15(q) => int_layer(&mut entries, at, q, LayerDtype::Q15)?,
        });
    }
    let tasks = spec.multi_gate.unwrap_or(1);
    if tasks == 0 || !n_layers.is_multiple_of(tasks) {
        return Err(Error::BadField { field: Field::Tasks, layer: 0 });
    }
    let per_task = n_layers / tasks;
    let output_dim: u32 = (1..=tasks).map(|t| records[t * per_task - 1][lw::OUT_DIM]).sum();
    let arch = if spec.multi_gate.is_some() { arch::MULTI_GATE } else { arch::MOE_STACK };
    let head = Head { arch, tasks, task: spec.task as u32, input_dim: records[0][lw::IN_DIM], output_dim };
    let bytes = assemble(&head, &[], &records, entries)?;
    // What was written must read back.
    crate::Model::parse(&crate::format::write::AlignedBytes::from(&bytes[..]))?;
    Ok(bytes)
}
