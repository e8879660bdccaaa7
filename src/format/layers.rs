//! Runnable layers made from a parsed model: views built on demand from the
//! tensor table, so nothing is copied and no RAM holds expert views.

use super::LayerInfo;
use super::layout::{LAYER_LEVEL, LayerDtype, SHARED_EXPERT, flags, part, role};
use super::table::{Elem, Key, Table};
use crate::error::{Error, Result, What};
use crate::expert::{Expert, QActivation, QExpert};
use crate::kernels::{Activation, FloatWeight, IntKernel, Linear, MulParams, QLinear};
use crate::moe::{
    Combine, Dims, ExpertSource, FloatGate, Gate, MoeLayer, QMoeLayer, QSharedExpert, SharedExpert,
};
use crate::quant::{Multiplier, QuantParams, f16};
use crate::router::{IntRouter, Router, Rule, Scoring};

fn key(layer: usize, expert: u16, role: u8, part: u8) -> Key {
    Key { layer: layer as u16, expert, role, part }
}

fn float_linear<'a, W: FloatWeight + Elem>(
    t: &Table<'a>,
    layer: usize,
    expert: u16,
    role: u8,
    rows: usize,
    cols: usize,
) -> Result<Linear<'a, W>> {
    let w = t.need::<W>(key(layer, expert, role, part::WEIGHT), rows, cols)?;
    let b = t.optional::<f32>(key(layer, expert, role, part::BIAS), rows, 1)?;
    Linear::new(w.data, b, rows, cols)
}

/// `CHECK`: validate every per-row multiplier (at parse); views rebuilt from
/// a parsed model skip that O(rows) pass.
fn int_linear<'a, A: IntKernel, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    expert: u16,
    role: u8,
    rows: usize,
    cols: usize,
) -> Result<QLinear<'a, A>>
where
    A::Bias: Elem,
{
    let w = t.need::<i8>(key(layer, expert, role, part::WEIGHT), rows, cols)?;
    let b = t.optional::<A::Bias>(key(layer, expert, role, part::BIAS), rows, 1)?;
    let m = t.need::<i32>(key(layer, expert, role, part::MULTIPLIER), rows, 1)?;
    let s = t.need::<i32>(key(layer, expert, role, part::SHIFT), rows, 1)?;
    if CHECK {
        QLinear::new(w.data, b, m.data, s.data, rows, cols, w.in_zp, w.out_zp)
    } else {
        QLinear::new_prevalidated(w.data, b, m.data, s.data, rows, cols, w.in_zp, w.out_zp)
    }
}

/// The float expert `expert` (or the shared one) of layer `layer`.
pub(crate) fn float_expert<'a, W: FloatWeight + Elem>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
    expert: u16,
) -> Result<Expert<'a, W>> {
    let hidden = if expert == SHARED_EXPERT { info.shared_hidden } else { info.hidden };
    // Routed experts may live in another layer (multi-gate MoE).
    let layer = if expert == SHARED_EXPERT { layer } else { info.experts_from };
    let up = float_linear(t, layer, expert, role::UP, hidden, info.in_dim)?;
    let down = float_linear(t, layer, expert, role::DOWN, info.out_dim, hidden)?;
    if info.flags & flags::GATED != 0 {
        let gate = float_linear(t, layer, expert, role::GATE_PROJ, hidden, info.in_dim)?;
        Expert::gated(gate, up, down, info.act)
    } else {
        Expert::mlp(up, down, info.act)
    }
}

/// The integer expert `expert` (or the shared one) of layer `layer`.
pub(crate) fn int_expert<'a, A: IntKernel + Elem, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
    expert: u16,
) -> Result<QExpert<'a, A>>
where
    A::Bias: Elem,
{
    let hidden = if expert == SHARED_EXPERT { info.shared_hidden } else { info.hidden };
    let layer = if expert == SHARED_EXPERT { layer } else { info.experts_from };
    let up = int_linear::<A, CHECK>(t, layer, expert, role::UP, hidden, info.in_dim)?;
    let down = int_linear::<A, CHECK>(t, layer, expert, role::DOWN, info.out_dim, hidden)?;
    let act = if info.act == Activation::Relu {
        QActivation::Relu
    } else {
        QActivation::Lut(t.need::<A>(key(layer, expert, role::LUT, part::WEIGHT), A::LUT_LEN, 1)?.data)
    };
    if info.flags & flags::GATED == 0 {
        return QExpert::mlp(up, act, down);
    }
    let gate = int_linear::<A, CHECK>(t, layer, expert, role::GATE_PROJ, hidden, info.in_dim)?;
    let p = t.need::<i32>(key(layer, expert, role::MUL, part::WEIGHT), 5, 1)?.data;
    let &[a_zp, b_zp, out_zp, multiplier, shift] = p else {
        return Err(Error::Shape { what: What::Requant, expected: 5, actual: p.len() });
    };
    let mul = MulParams { a_zp, b_zp, out_zp, multiplier: Multiplier { multiplier, shift } };
    QExpert::gated(gate, up, act, mul, down)
}

/// Routed experts of one layer, made on demand from the tensor table.
#[derive(Debug, Clone, Copy)]
pub struct Experts<'a, E> {
    table: Table<'a>,
    layer: usize,
    info: LayerInfo,
    make: fn(&Table<'a>, usize, &LayerInfo, u16) -> Result<E>,
}

impl<E: Copy> ExpertSource for Experts<'_, E> {
    type Expert = E;

    fn count(&self) -> usize {
        self.info.experts
    }

    fn expert(&self, i: usize) -> Result<E> {
        if i >= self.info.experts {
            return Err(Error::OutOfRange { what: What::Experts, index: i });
        }
        (self.make)(&self.table, self.layer, &self.info, i as u16)
    }
}

/// Float experts (f32 or f16 weights) made on demand.
pub type FloatExperts<'a, W> = Experts<'a, Expert<'a, W>>;
/// Integer experts (int8 or Q15) made on demand.
pub type IntExperts<'a, A> = Experts<'a, QExpert<'a, A>>;

/// One MoE layer of a model, in its numeric type.
#[derive(Debug, Clone, Copy)]
pub enum Layer<'a> {
    /// f32 gate and experts.
    F32(MoeLayer<'a, f32, f32, FloatExperts<'a, f32>>),
    /// f16 gate and experts.
    F16(MoeLayer<'a, f16, f16, FloatExperts<'a, f16>>),
    /// f32 gate, f16 experts.
    F32GateF16(MoeLayer<'a, f32, f16, FloatExperts<'a, f16>>),
    /// f16 gate, f32 experts.
    F16GateF32(MoeLayer<'a, f16, f32, FloatExperts<'a, f32>>),
    /// int8 end to end; input and output quantization.
    Int8(QMoeLayer<'a, i8, IntExperts<'a, i8>>, QuantParams, QuantParams),
    /// Q15 end to end; input and output quantization.
    Q15(QMoeLayer<'a, i16, IntExperts<'a, i16>>, QuantParams, QuantParams),
}

/// The sizes a layer's constructor would find by visiting every expert,
/// from its record (the same formulas as `Ffn::macs` and `hidden_len`).
fn dims(info: &LayerInfo) -> Dims {
    let buffers = if info.flags & flags::GATED != 0 { 2 } else { 1 };
    let (i, h, o) = (info.in_dim as u64, info.hidden as u64, info.out_dim as u64);
    Dims {
        out_dim: info.out_dim,
        hidden_max: buffers * info.hidden.max(info.shared_hidden),
        macs_experts: info.experts as u64 * (buffers as u64 * i * h + h * o),
    }
}

pub(crate) fn rule(info: &LayerInfo) -> Rule {
    let scoring = if info.flags & flags::SIGMOID != 0 { Scoring::Sigmoid } else { Scoring::Softmax };
    let groups =
        (info.n_group > 1).then_some(crate::router::Groups { count: info.n_group, keep: info.topk_group });
    Rule { experts: info.experts, k: info.k, scoring, normalize: info.flags & flags::NORMALIZE != 0, groups }
}

fn float_layer<'a, G: FloatWeight + Elem, W: FloatWeight + Elem, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
) -> Result<MoeLayer<'a, G, W, FloatExperts<'a, W>>> {
    let gate = float_linear::<G>(t, layer, LAYER_LEVEL, role::GATE, info.experts, info.in_dim)?;
    let bias = if info.flags & flags::SELECTION_BIAS != 0 {
        Some(
            t.need::<f32>(key(layer, LAYER_LEVEL, role::SELECTION_BIAS, part::WEIGHT), info.experts, 1)?.data,
        )
    } else {
        None
    };
    let router = Router::new(rule(info), bias, info.scaling)?;
    let shared = if info.flags & flags::SHARED != 0 {
        let expert = float_expert::<W>(t, layer, info, SHARED_EXPERT)?;
        let gate = if info.flags & flags::SHARED_GATE != 0 {
            Some(float_linear::<W>(t, layer, SHARED_EXPERT, role::SHARED_GATE, 1, info.in_dim)?)
        } else {
            None
        };
        Some(SharedExpert { expert, gate })
    } else {
        None
    };
    // At parse, every expert is built once so a missing tensor is an error
    // now, not a silently skipped expert later.
    for e in (0..info.experts).filter(|_| CHECK) {
        float_expert::<W>(t, layer, info, e as u16)?;
    }
    let experts = Experts { table: *t, layer, info: *info, make: float_expert::<W> };
    if CHECK {
        MoeLayer::new(gate, router, experts, shared)
    } else {
        Ok(MoeLayer::from_dims(gate, router, experts, shared, dims(info)))
    }
}

fn int_layer<'a, A: IntKernel + Elem, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
) -> Result<QMoeLayer<'a, A, IntExperts<'a, A>>>
where
    A::Bias: Elem,
{
    let shared = if info.flags & flags::SHARED != 0 {
        let expert = int_expert::<A, CHECK>(t, layer, info, SHARED_EXPERT)?;
        let gate = if info.flags & flags::SHARED_GATE != 0 {
            Some(int_linear::<A, CHECK>(t, layer, SHARED_EXPERT, role::SHARED_GATE, 1, info.in_dim)?)
        } else {
            None
        };
        Some(QSharedExpert { expert, gate })
    } else {
        None
    };
    for e in (0..info.experts).filter(|_| CHECK) {
        int_expert::<A, true>(t, layer, info, e as u16)?;
    }
    let experts = Experts { table: *t, layer, info: *info, make: int_expert::<A, false> };
    let selection_bias = key(layer, LAYER_LEVEL, role::SELECTION_BIAS, part::WEIGHT);
    let has_bias = info.flags & flags::SELECTION_BIAS != 0;
    let gate_key = (layer, LAYER_LEVEL, role::GATE, info.experts, info.in_dim);
    // A float gate (f32 or f16) may route integer experts.
    let float_gate = |g| -> Result<_> {
        let bias = if has_bias { Some(t.need::<f32>(selection_bias, info.experts, 1)?.data) } else { None };
        let router = Router::new(rule(info), bias, info.scaling)?;
        if CHECK {
            QMoeLayer::with_float_gate(g, router, info.input, experts, shared, info.combine)
        } else {
            Ok(QMoeLayer::from_dims(
                Gate::Float(g, router, info.input),
                experts,
                shared,
                info.combine,
                dims(info),
            ))
        }
    };
    let (l, e, r, rows, cols) = gate_key;
    match info.gate_dtype {
        LayerDtype::F32 => float_gate(FloatGate::F32(float_linear(t, l, e, r, rows, cols)?)),
        LayerDtype::F16 => float_gate(FloatGate::F16(float_linear(t, l, e, r, rows, cols)?)),
        _ => {
            let gate = int_linear::<A, CHECK>(t, l, e, r, rows, cols)?;
            let bias =
                if has_bias { Some(t.need::<i32>(selection_bias, info.experts, 1)?.data) } else { None };
            let router = IntRouter::new(rule(info), bias, info.scaling_q15)?;
            if CHECK {
                QMoeLayer::new(gate, router, experts, shared, info.combine)
            } else {
                Ok(QMoeLayer::from_dims(Gate::Int(gate, router), experts, shared, info.combine, dims(info)))
            }
        }
    }
}

/// Builds layer `layer` (validating every tensor it uses).
/// Builds layer `layer`; with `CHECK` (at parse) every tensor of every expert
/// is validated, without it (views rebuilt per inference) only what O(1)
/// checks cover.
// Kept out of line: inlined into `Model::infer`, every layer type's locals
// would share one frame and multiply the stack a model needs.
#[inline(never)]
pub(crate) fn build<'a, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
) -> Result<Layer<'a>> {
    use LayerDtype::*;
    Ok(match (info.gate_dtype, info.expert_dtype) {
        (F32, F32) => Layer::F32(float_layer::<_, _, CHECK>(t, layer, info)?),
        (F16, F16) => Layer::F16(float_layer::<_, _, CHECK>(t, layer, info)?),
        (F32, F16) => Layer::F32GateF16(float_layer::<_, _, CHECK>(t, layer, info)?),
        (F16, F32) => Layer::F16GateF32(float_layer::<_, _, CHECK>(t, layer, info)?),
        (_, Int8) => Layer::Int8(int_layer::<_, CHECK>(t, layer, info)?, info.input, info.output),
        (_, Q15) => Layer::Q15(int_layer::<_, CHECK>(t, layer, info)?, info.input, info.output),
        _ => return Err(crate::Error::BadField { field: crate::error::Field::Dtype, layer }),
    })
}

/// Quantization of an integer layer's combine, read from its record.
pub(crate) fn combine(expert_zp: i32, multiplier: i32, shift: i32, out_zp: i32) -> Combine {
    Combine { expert_zp, multiplier: Multiplier { multiplier, shift }, out_zp }
}
