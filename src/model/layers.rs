//! Runnable layers made from a parsed model, resolved by position.
//!
//! The tensor table is sorted by `(layer, expert, role, part)`, and
//! [`Model::parse`](super::Model::parse) checks that every routed expert of
//! a layer has the same entries as expert 0, in the same order. So a layer
//! is found with one binary search (its first entry), the parts of its
//! experts, shared expert and gate with one scan of expert 0's block and of
//! the layer-level entries, and expert `i`'s tensors are then entries
//! `first + i * stride + slot`: no search per expert, no copy, no RAM that
//! grows with the experts. At parse the same code runs with `CHECK`, which
//! also compares each entry's key, dtype and shape with what the layer
//! needs; without it (every inference) only slicing is left.

// A build that leaves numeric types out (cargo features) keeps the match
// arms of the others only: parts of what follows then serve no arm.
#![cfg_attr(
    not(all(feature = "f32", feature = "f16", feature = "int8", feature = "q15")),
    allow(dead_code, unused_imports, unused_variables, unreachable_code)
)]

use super::LayerInfo;
use crate::error::{Error, Result, TensorProblem, What};
use crate::expert::{Expert, QActivation, QExpert};
use crate::format::layout::{LAYER_LEVEL, LayerDtype, SHARED_EXPERT, flags, part, role};
use crate::format::{Elem, Key, Table};
use crate::kernels::{Activation, FloatWeight, IntKernel, Linear, MulParams, QLinear};
use crate::moe::SharedSource;
use crate::moe::{
    Combine, Dims, ExpertSource, FloatGate, Gate, MoeLayer, QMoeLayer, QSharedExpert, SharedExpert,
};
use crate::quant::{Multiplier, QuantParams, f16};
use crate::router::{Choice, IntRouter, ONE_Q15, Router, Rule, Scoring, Selection};
use crate::scratch::Carve;

fn key(layer: usize, expert: u16, role: u8, part: u8) -> Key {
    Key { layer: layer as u16, expert, role, part }
}

/// An absent part.
const NONE: u8 = u8::MAX;

/// Where one linear's parts sit in a block of entries (offsets from the
/// block's first entry; [`NONE`] if absent). Word-aligned, so copies
/// are word moves, not byte loops.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(4))]
struct LinearAt {
    w: u8,
    b: u8,
    m: u8,
    s: u8,
}

/// Where each tensor of one `(layer, expert)` block sits: the offset of
/// `(role, part)` from the block's first entry at index `4 role + part`
/// (stack layers use roles below 8 and parts below 4: validated at parse),
/// [`NONE`] if absent. Word-aligned, so copies are word moves.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(4))]
pub(crate) struct BlockAt([u8; 32]);

impl BlockAt {
    /// The four parts of `role`'s linear.
    fn lin(&self, role: u8) -> LinearAt {
        let at = |part: u8| self.0.get(4 * role as usize + part as usize).copied().unwrap_or(NONE);
        LinearAt { w: at(part::WEIGHT), b: at(part::BIAS), m: at(part::MULTIPLIER), s: at(part::SHIFT) }
    }

    /// `role`'s single tensor (part 0).
    fn one(&self, role: u8) -> u8 {
        self.0.get(4 * role as usize).copied().unwrap_or(NONE)
    }
}

/// Reads the block of entries from `start` whose key is `(layer, expert,
/// ..)`: where each part sits, and how many entries it has. A block has at
/// most `role::COUNT * part::COUNT` (32) entries, so offsets fit a byte.
fn scan(t: &Table<'_>, start: usize, layer: usize, expert: u16) -> (BlockAt, usize) {
    let (at, n) = t.scan_block::<32, { part::COUNT as usize }>(start, layer as u16, expert);
    (BlockAt(at), n)
}

/// Where a layer's tensors sit: its routed experts' blocks (possibly
/// another layer's: multi-gate MoE), its shared expert and its level.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerAt {
    /// First entry of expert 0.
    first: usize,
    /// Entries per routed expert.
    stride: usize,
    expert: BlockAt,
    /// First entry of the shared expert's block, and where its parts sit.
    shared_first: usize,
    shared: BlockAt,
    /// First entry of the layer-level block.
    level_first: usize,
    level: BlockAt,
}

/// Finds layer `layer`'s blocks: one or two binary searches and a scan of
/// three blocks. Checks nothing (see [`check_experts`]).
pub(crate) fn locate(t: &Table<'_>, layer: usize, info: &LayerInfo) -> LayerAt {
    let src = info.experts_from;
    let first = t.lower_bound(key(src, 0, 0, 0));
    let (expert, stride) = scan(t, first, src, 0);
    let shared_first =
        if src == layer { first + info.experts * stride } else { t.lower_bound(key(layer, 0, 0, 0)) };
    let (shared, n) = scan(t, shared_first, layer, SHARED_EXPERT);
    let level_first = shared_first + n;
    let (level, _) = scan(t, level_first, layer, LAYER_LEVEL);
    LayerAt { first, stride, expert, shared_first, shared, level_first, level }
}

/// At parse: every routed expert's block has expert 0's roles and parts in
/// the same order (so positions found in expert 0's block hold in every
/// other), and the shared and level blocks follow the last expert.
pub(crate) fn check_experts(t: &Table<'_>, layer: usize, info: &LayerInfo, at: &LayerAt) -> Result<()> {
    if info.experts_from != layer {
        return Ok(());
    }
    for e in 1..info.experts {
        for j in 0..at.stride {
            let index = at.first + e * at.stride + j;
            let (Some(k0), Some(k)) = (t.key(at.first + j), t.key(index)) else {
                return Err(Error::BadTensor { index, problem: TensorProblem::Pattern });
            };
            if k != (Key { expert: e as u16, ..k0 }) {
                return Err(Error::BadTensor { index, problem: TensorProblem::Pattern });
            }
        }
    }
    // Expert `experts` would be out of range (refused by the entry check),
    // so the next block is the shared expert's or the layer level's.
    Ok(())
}

/// Entry `base + slot` as `T`: `MissingTensor` (naming `k`) if absent; with
/// `CHECK` also if its key, dtype or shape is not `k`, `T`, `(rows, cols)`.
fn need<'a, T: Elem, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    slot: u8,
    k: Key,
    (rows, cols): (usize, usize),
) -> Result<(&'a [T], usize)> {
    let missing = Error::MissingTensor { layer: k.layer, expert: k.expert, role: k.role, part: k.part };
    if slot == NONE {
        return Err(missing);
    }
    let i = base + slot as usize;
    if CHECK && (t.key(i) != Some(k) || t.shape(i) != Some((T::DTYPE, rows as u32, cols as u32))) {
        return Err(missing);
    }
    Ok((t.data::<T>(i).ok_or(missing)?, i))
}

/// Like [`need`], `None` if absent.
fn optional<'a, T: Elem, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    slot: u8,
    k: Key,
    shape: (usize, usize),
) -> Result<Option<&'a [T]>> {
    if slot == NONE { Ok(None) } else { need::<T, CHECK>(t, base, slot, k, shape).map(|(d, _)| Some(d)) }
}

/// A router's selection bias: required where the record's flag says so.
fn selection_bias<'a, T: Elem, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    present: bool,
    (slot, k, shape): (u8, Key, (usize, usize)),
) -> Result<Option<&'a [T]>> {
    if present { need::<T, CHECK>(t, base, slot, k, shape).map(|(d, _)| Some(d)) } else { Ok(None) }
}

/// Which linear of which block: for error messages and checks.
#[derive(Clone, Copy)]
struct Site {
    layer: usize,
    expert: u16,
    role: u8,
}

impl Site {
    fn key(&self, part: u8) -> Key {
        key(self.layer, self.expert, self.role, part)
    }
}

fn float_linear<'a, W: FloatWeight + Elem, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    at: LinearAt,
    site: Site,
    rows: usize,
    cols: usize,
) -> Result<Linear<'a, W>> {
    let (w, _) = need::<W, CHECK>(t, base, at.w, site.key(part::WEIGHT), (rows, cols))?;
    let b = optional::<f32, CHECK>(t, base, at.b, site.key(part::BIAS), (rows, 1))?;
    Linear::new(w, b, rows, cols)
}

/// `CHECK` (at parse) also validates every per-row multiplier; views
/// rebuilt from a parsed model skip that O(rows) pass.
fn int_linear<'a, A: IntKernel, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    at: LinearAt,
    site: Site,
    rows: usize,
    cols: usize,
) -> Result<QLinear<'a, A>>
where
    A::Bias: Elem,
{
    let (w, i) = need::<i8, CHECK>(t, base, at.w, site.key(part::WEIGHT), (rows, cols))?;
    let (in_zp, out_zp) = t.zero_points(i);
    let b = optional::<A::Bias, CHECK>(t, base, at.b, site.key(part::BIAS), (rows, 1))?;
    let (m, _) = need::<i32, CHECK>(t, base, at.m, site.key(part::MULTIPLIER), (rows, 1))?;
    let (s, _) = need::<i32, CHECK>(t, base, at.s, site.key(part::SHIFT), (rows, 1))?;
    if CHECK {
        QLinear::new(w, b, m, s, rows, cols, in_zp, out_zp)
    } else {
        QLinear::new_prevalidated(w, b, m, s, rows, cols, in_zp, out_zp)
    }
}

/// What every routed expert of a layer shares: widths, non-linearity, and
/// where the layer's experts are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    in_dim: usize,
    hidden: usize,
    out_dim: usize,
    act: Activation,
    gated: bool,
    /// The layer whose blocks hold the experts.
    layer: usize,
}

fn shape(info: &LayerInfo, hidden: usize, layer: usize) -> Shape {
    Shape {
        in_dim: info.in_dim,
        hidden,
        out_dim: info.out_dim,
        act: info.act,
        gated: info.flags & flags::GATED != 0,
        layer,
    }
}

/// The float expert whose block starts at `base`.
fn float_expert<'a, W: FloatWeight + Elem, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    at: &BlockAt,
    sh: &Shape,
    expert: u16,
) -> Result<Expert<'a, W>> {
    let site = |role| Site { layer: sh.layer, expert, role };
    let up = float_linear::<W, CHECK>(t, base, at.lin(role::UP), site(role::UP), sh.hidden, sh.in_dim)?;
    let down =
        float_linear::<W, CHECK>(t, base, at.lin(role::DOWN), site(role::DOWN), sh.out_dim, sh.hidden)?;
    if sh.gated {
        let gate = float_linear::<W, CHECK>(
            t,
            base,
            at.lin(role::GATE_PROJ),
            site(role::GATE_PROJ),
            sh.hidden,
            sh.in_dim,
        )?;
        Expert::gated(gate, up, down, sh.act)
    } else {
        Expert::mlp(up, down, sh.act)
    }
}

/// The integer expert whose block starts at `base`.
fn int_expert<'a, A: IntKernel + Elem, const CHECK: bool>(
    t: &Table<'a>,
    base: usize,
    at: &BlockAt,
    sh: &Shape,
    expert: u16,
) -> Result<QExpert<'a, A>>
where
    A::Bias: Elem,
{
    let site = |role| Site { layer: sh.layer, expert, role };
    let up = int_linear::<A, CHECK>(t, base, at.lin(role::UP), site(role::UP), sh.hidden, sh.in_dim)?;
    let down = int_linear::<A, CHECK>(t, base, at.lin(role::DOWN), site(role::DOWN), sh.out_dim, sh.hidden)?;
    let act = if sh.act == Activation::Relu {
        QActivation::Relu
    } else {
        let k = site(role::LUT).key(part::WEIGHT);
        QActivation::Lut(need::<A, CHECK>(t, base, at.one(role::LUT), k, (A::LUT_LEN, 1))?.0)
    };
    if !sh.gated {
        return QExpert::mlp(up, act, down);
    }
    let gate = int_linear::<A, CHECK>(
        t,
        base,
        at.lin(role::GATE_PROJ),
        site(role::GATE_PROJ),
        sh.hidden,
        sh.in_dim,
    )?;
    let k = site(role::MUL).key(part::WEIGHT);
    let (p, _) = need::<i32, CHECK>(t, base, at.one(role::MUL), k, (5, 1))?;
    let &[a_zp, b_zp, out_zp, multiplier, shift] = p else {
        return Err(Error::Shape { what: What::Requant, expected: 5, actual: p.len() });
    };
    let mul = MulParams { a_zp, b_zp, out_zp, multiplier: Multiplier { multiplier, shift } };
    QExpert::gated(gate, up, act, mul, down)
}

/// Routed experts of one layer, made on demand from the tensor table by
/// position (see the module docs): a few words, whatever the number of
/// experts.
#[derive(Debug, Clone, Copy)]
pub struct Experts<'a, E> {
    table: Table<'a>,
    first: usize,
    stride: usize,
    count: usize,
    at: BlockAt,
    shape: Shape,
    make: fn(&Table<'a>, usize, &BlockAt, &Shape, u16) -> Result<E>,
}

impl<E: Copy> ExpertSource for Experts<'_, E> {
    type Expert = E;

    fn count(&self) -> usize {
        self.count
    }

    fn expert(&self, i: usize) -> Result<E> {
        if i >= self.count {
            return Err(Error::OutOfRange { what: What::Experts, index: i });
        }
        (self.make)(&self.table, self.first + i * self.stride, &self.at, &self.shape, i as u16)
    }
}

/// Float experts (f32 or f16 weights) made on demand.
pub type FloatExperts<'a, W> = Experts<'a, Expert<'a, W>>;
/// Integer experts (int8 or Q15) made on demand.
pub type IntExperts<'a, A> = Experts<'a, QExpert<'a, A>>;

/// Where a parsed integer layer's shared expert (and its gate) sits: its
/// views are made when an inference needs them, so a built layer carries
/// these positions (about 80 bytes on a 32-bit MCU) instead of the views
/// (220 bytes, held even by layers without one).
#[derive(Debug, Clone, Copy)]
pub struct IntShared<'a> {
    table: Table<'a>,
    first: usize,
    at: BlockAt,
    shape: Shape,
    gate: bool,
}

impl<'a, A: IntKernel + Elem> SharedSource<'a, A> for Option<IntShared<'a>>
where
    A::Bias: Elem,
{
    // Without the `shared` feature parse refuses a layer with one, and
    // none of the code that runs it is linked.
    fn has_shared(&self) -> bool {
        cfg!(feature = "shared") && self.is_some()
    }

    fn shared(&self) -> Result<Option<QSharedExpert<'a, A>>> {
        let Some(s) = self.filter(|_| cfg!(feature = "shared")) else { return Ok(None) };
        let expert = int_expert::<A, false>(&s.table, s.first, &s.at, &s.shape, SHARED_EXPERT)?;
        let gate = if s.gate {
            let site = Site { layer: s.shape.layer, expert: SHARED_EXPERT, role: role::SHARED_GATE };
            let lin = s.at.lin(role::SHARED_GATE);
            Some(int_linear::<A, false>(&s.table, s.first, lin, site, 1, s.shape.in_dim)?)
        } else {
            None
        };
        Ok(Some(QSharedExpert { expert, gate }))
    }
}

/// At parse: the shared expert at `s` with every check (its tensors, and
/// against the layer as `QMoeLayer::new` checks one), in a frame of its own.
#[inline(never)]
fn check_shared_at<A: IntKernel + Elem>(
    t: &Table<'_>,
    s: &IntShared<'_>,
    input: (usize, i32),
    info: &LayerInfo,
) -> Result<()>
where
    A::Bias: Elem,
{
    let expert = int_expert::<A, true>(t, s.first, &s.at, &s.shape, SHARED_EXPERT)?;
    let gate = if s.gate {
        let site = Site { layer: s.shape.layer, expert: SHARED_EXPERT, role: role::SHARED_GATE };
        Some(int_linear::<A, true>(t, s.first, s.at.lin(role::SHARED_GATE), site, 1, s.shape.in_dim)?)
    } else {
        None
    };
    crate::moe::check_shared(&QSharedExpert { expert, gate }, input, (info.out_dim, info.combine.expert_zp))
}

/// An integer layer of a parsed model.
pub type IntLayer<'a, A> = QMoeLayer<'a, A, IntExperts<'a, A>, Option<IntShared<'a>>>;

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
    Int8(IntLayer<'a, i8>, QuantParams, QuantParams),
    /// Q15 end to end; input and output quantization.
    Q15(IntLayer<'a, i16>, QuantParams, QuantParams),
}

/// The activation types a stack runs on integers end to end: `i8`
/// (int8 layers) and `i16` (Q15 layers); see
/// [`Model::infer_int`](crate::Model::infer_int).
pub trait IntPath: IntKernel + Elem
where
    Self::Bias: Elem,
{
    /// The layer's MoE layer, if its experts are of this type.
    fn layer<'l, 'a>(layer: &'l Layer<'a>) -> Option<&'l IntLayer<'a, Self>>;
}

impl IntPath for i8 {
    fn layer<'l, 'a>(layer: &'l Layer<'a>) -> Option<&'l IntLayer<'a, i8>> {
        match layer {
            Layer::Int8(q, ..) => Some(q),
            _ => None,
        }
    }
}

impl IntPath for i16 {
    fn layer<'l, 'a>(layer: &'l Layer<'a>) -> Option<&'l IntLayer<'a, i16>> {
        match layer {
            Layer::Q15(q, ..) => Some(q),
            _ => None,
        }
    }
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

fn experts<'a, E>(
    t: &Table<'a>,
    info: &LayerInfo,
    at: &LayerAt,
    make: fn(&Table<'a>, usize, &BlockAt, &Shape, u16) -> Result<E>,
) -> Experts<'a, E> {
    Experts {
        table: *t,
        first: at.first,
        stride: at.stride,
        count: info.experts,
        at: at.expert,
        shape: shape(info, info.hidden, info.experts_from),
        make,
    }
}

#[inline(always)]
fn float_layer<'a, G: FloatWeight + Elem, W: FloatWeight + Elem, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
    at: &LayerAt,
) -> Result<MoeLayer<'a, G, W, FloatExperts<'a, W>>> {
    let level = |role| Site { layer, expert: LAYER_LEVEL, role };
    let gate = float_linear::<G, CHECK>(
        t,
        at.level_first,
        at.level.lin(role::GATE),
        level(role::GATE),
        info.experts,
        info.in_dim,
    )?;
    let bias = if info.flags & flags::SELECTION_BIAS != 0 {
        let k = level(role::SELECTION_BIAS).key(part::WEIGHT);
        Some(
            need::<f32, CHECK>(t, at.level_first, at.level.one(role::SELECTION_BIAS), k, (info.experts, 1))?
                .0,
        )
    } else {
        None
    };
    let router = Router::new(rule(info), bias, info.scaling)?;
    let shared = if info.flags & flags::SHARED != 0 {
        let sh = shape(info, info.shared_hidden, layer);
        let expert = float_expert::<W, CHECK>(t, at.shared_first, &at.shared, &sh, SHARED_EXPERT)?;
        let gate = if info.flags & flags::SHARED_GATE != 0 {
            let site = Site { layer, expert: SHARED_EXPERT, role: role::SHARED_GATE };
            Some(float_linear::<W, CHECK>(
                t,
                at.shared_first,
                at.shared.lin(role::SHARED_GATE),
                site,
                1,
                info.in_dim,
            )?)
        } else {
            None
        };
        Some(SharedExpert { expert, gate })
    } else {
        None
    };
    let experts = experts(t, info, at, float_expert::<W, false>);
    if CHECK {
        // At parse every expert is built once, checked, so a missing or
        // malformed tensor is an error now and never an expert skipped later.
        check_experts(t, layer, info, at)?;
        for e in 0..info.experts {
            float_expert::<W, true>(t, at.first + e * at.stride, &at.expert, &experts.shape, e as u16)?;
        }
        MoeLayer::new(gate, router, experts, shared)
    } else {
        Ok(MoeLayer::from_dims(gate, router, experts, shared, dims(info)))
    }
}

#[inline(always)]
fn int_layer<'a, A: IntKernel + Elem, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
    at: &LayerAt,
) -> Result<IntLayer<'a, A>>
where
    A::Bias: Elem,
{
    let shared_at = (info.flags & flags::SHARED != 0).then(|| IntShared {
        table: *t,
        first: at.shared_first,
        at: at.shared,
        shape: shape(info, info.shared_hidden, layer),
        gate: info.flags & flags::SHARED_GATE != 0,
    });
    let experts = experts(t, info, at, int_expert::<A, false>);
    let level = |role| Site { layer, expert: LAYER_LEVEL, role };
    let has_bias = info.flags & flags::SELECTION_BIAS != 0;
    let (base, gate_at, gate_site) = (at.level_first, at.level.lin(role::GATE), level(role::GATE));
    let bias_key = level(role::SELECTION_BIAS).key(part::WEIGHT);
    let (rows, cols) = (info.experts, info.in_dim);
    let bias_at = (at.level.one(role::SELECTION_BIAS), bias_key, (info.experts, 1));
    // A float gate (f32 or f16) may route integer experts.
    let float_gate = |g| -> Result<Gate<'a, A>> {
        let bias = selection_bias::<f32, CHECK>(t, base, has_bias, bias_at)?;
        Ok(Gate::Float(g, Router::new(rule(info), bias, info.scaling)?, info.input))
    };
    let gate = match info.gate_dtype {
        LayerDtype::Int8 | LayerDtype::Q15 => {
            let gate = int_linear::<A, CHECK>(t, base, gate_at, gate_site, rows, cols)?;
            let bias = selection_bias::<i32, CHECK>(t, base, has_bias, bias_at)?;
            Gate::Int(gate, IntRouter::new(rule(info), bias, info.scaling_q15)?)
        }
        #[cfg(feature = "f32")]
        LayerDtype::F32 => {
            float_gate(FloatGate::F32(float_linear::<_, CHECK>(t, base, gate_at, gate_site, rows, cols)?))?
        }
        #[cfg(feature = "f16")]
        LayerDtype::F16 => {
            float_gate(FloatGate::F16(float_linear::<_, CHECK>(t, base, gate_at, gate_site, rows, cols)?))?
        }
        // A float gate this build leaves out: refused at parse.
        #[allow(unreachable_patterns)]
        _ => return Err(Error::BadField { field: crate::error::Field::Dtype, layer }),
    };
    if CHECK {
        // Every expert built once with every check, then held to the
        // layer's input and output (as `QMoeLayer::new` does, without
        // building each a second time); the shared expert's views are made
        // and checked out of line.
        crate::moe::check_parts(&gate, info.experts, &info.combine)?;
        check_experts(t, layer, info, at)?;
        let input = (gate.cols(), gate.input_zp());
        let output = (info.out_dim, info.combine.expert_zp);
        for e in 0..info.experts {
            let x = int_expert::<A, true>(t, at.first + e * at.stride, &at.expert, &experts.shape, e as u16)?;
            crate::moe::check_expert(&x, input, output)?;
        }
        if let Some(s) = shared_at.as_ref().filter(|_| cfg!(feature = "shared")) {
            check_shared_at::<A>(t, s, input, info)?;
        }
    }
    Ok(QMoeLayer::from_dims(gate, experts, shared_at, info.combine, dims(info)))
}

/// One match over a layer's (gate, experts) types with the arms this build
/// has (cargo features): `$float` with the float types named `G` (gate) and
/// `W` (experts), `$int` with the integer activation type `A`; a type left
/// out (refused at parse) is an error.
macro_rules! by_type {
    ($info:expr, $layer:expr, |$g:ident, $w:ident| $float:expr, |$a:ident| $int:expr) => {{
        use LayerDtype::*;
        match ($info.gate_dtype, $info.expert_dtype) {
            #[cfg(feature = "f32")]
            (F32, F32) => {
                type $g = f32;
                type $w = f32;
                $float
            }
            #[cfg(feature = "f16")]
            (F16, F16) => {
                type $g = f16;
                type $w = f16;
                $float
            }
            #[cfg(all(feature = "f32", feature = "f16"))]
            (F32, F16) => {
                type $g = f32;
                type $w = f16;
                $float
            }
            #[cfg(all(feature = "f32", feature = "f16"))]
            (F16, F32) => {
                type $g = f16;
                type $w = f32;
                $float
            }
            #[cfg(feature = "int8")]
            (_, Int8) => {
                type $a = i8;
                $int
            }
            #[cfg(feature = "q15")]
            (_, Q15) => {
                type $a = i16;
                $int
            }
            _ => Err(crate::Error::BadField { field: crate::error::Field::Dtype, layer: $layer }),
        }
    }};
}

/// Builds layer `layer`; with `CHECK` (at parse) every tensor of every
/// expert is checked, without it (views rebuilt for an inference) only what
/// O(1) checks cover.
// Inlined into its two callers (`Model::layer`, `Resolved::new`): the
// layer is then built where it is stored instead of copied there.
#[inline(always)]
pub(crate) fn build<'a, const CHECK: bool>(
    t: &Table<'a>,
    layer: usize,
    info: &LayerInfo,
) -> Result<Layer<'a>> {
    use LayerDtype::*;
    let at = &locate(t, layer, info);
    Ok(match (info.gate_dtype, info.expert_dtype) {
        #[cfg(feature = "f32")]
        (F32, F32) => Layer::F32(float_layer::<_, _, CHECK>(t, layer, info, at)?),
        #[cfg(feature = "f16")]
        (F16, F16) => Layer::F16(float_layer::<_, _, CHECK>(t, layer, info, at)?),
        #[cfg(all(feature = "f32", feature = "f16"))]
        (F32, F16) => Layer::F32GateF16(float_layer::<_, _, CHECK>(t, layer, info, at)?),
        #[cfg(all(feature = "f32", feature = "f16"))]
        (F16, F32) => Layer::F16GateF32(float_layer::<_, _, CHECK>(t, layer, info, at)?),
        #[cfg(feature = "int8")]
        (_, Int8) => Layer::Int8(int_layer::<_, CHECK>(t, layer, info, at)?, info.input, info.output),
        #[cfg(feature = "q15")]
        (_, Q15) => Layer::Q15(int_layer::<_, CHECK>(t, layer, info, at)?, info.input, info.output),
        _ => return Err(crate::Error::BadField { field: crate::error::Field::Dtype, layer }),
    })
}

/// At parse: builds layer `layer` with every check (each expert's
/// tensors, every multiplier), in one out-of-line function per type that
/// keeps nothing, so parse needs the stack of the one type it meets.
pub(crate) fn validate(t: &Table<'_>, layer: usize, info: &LayerInfo) -> Result<()> {
    let at = &locate(t, layer, info);
    by_type!(info, layer, |G, W| check_float::<G, W>(t, layer, info, at), |A| check_int::<A>(
        t, layer, info, at
    ))
}

#[inline(never)]
fn check_float<G: FloatWeight + Elem, W: FloatWeight + Elem>(
    t: &Table<'_>,
    layer: usize,
    info: &LayerInfo,
    at: &LayerAt,
) -> Result<()> {
    float_layer::<G, W, true>(t, layer, info, at).map(|_| ())
}

#[inline(never)]
fn check_int<A: IntKernel + Elem>(t: &Table<'_>, layer: usize, info: &LayerInfo, at: &LayerAt) -> Result<()>
where
    A::Bias: Elem,
{
    int_layer::<A, true>(t, layer, info, at).map(|_| ())
}

/// What one layer did: its choice (integer layers: Q15 / 32768), its output
/// width, and the multiply-accumulates done and with every expert active.
pub(crate) type Ran = (Selection<f32>, usize, (u64, u64));

/// Builds layer `layer` from its record and runs it on f32 activations
/// (integer layers quantize `x` and dequantize into `y` with the record's
/// parameters). Each layer type is built and run in a function of its own,
/// kept out of line, so a view is built where it is used (no copies of a
/// layer returned by value) and each type's locals live in their own frame.
pub(crate) fn run(
    t: &Table<'_>,
    layer: usize,
    info: &LayerInfo,
    x: &[f32],
    y: &mut [f32],
    q: (&mut [u8], &mut [u8]),
    scratch: &mut [u8],
) -> Result<Ran> {
    let at = &locate(t, layer, info);
    by_type!(info, layer, |G, W| run_float::<G, W>(t, layer, info, at, x, y, scratch), |A| run_int::<A>(
        t, layer, info, at, x, y, q, scratch
    ))
}

#[inline(never)]
fn run_float<G: FloatWeight + Elem, W: FloatWeight + Elem>(
    t: &Table<'_>,
    layer: usize,
    info: &LayerInfo,
    at: &LayerAt,
    x: &[f32],
    y: &mut [f32],
    scratch: &mut [u8],
) -> Result<Ran> {
    let l = float_layer::<G, W, false>(t, layer, info, at)?;
    let out = l.out_dim();
    let len = y.len();
    let y = y.get_mut(..out).ok_or(Error::Shape { what: What::Output, expected: out, actual: len })?;
    let sel = l.infer(x, y, scratch)?;
    let macs = macs(info, sel.len());
    Ok((sel, out, macs))
}

#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn run_int<A: IntKernel + Elem>(
    t: &Table<'_>,
    layer: usize,
    info: &LayerInfo,
    at: &LayerAt,
    x: &[f32],
    y: &mut [f32],
    (qa, qb): (&mut [u8], &mut [u8]),
    scratch: &mut [u8],
) -> Result<Ran>
where
    A::Bias: Elem,
{
    let (n_in, n_out) = (info.in_dim, info.out_dim);
    let xq = Carve::new(qa).take::<A>(n_in)?;
    let yq = Carve::new(qb).take::<A>(n_out)?;
    info.input.quantize_slice(x.get(..n_in).unwrap_or(x), xq)?;
    let sel = run_q(t, layer, info, at, xq, yq, scratch)?;
    let len = y.len();
    let y = y.get_mut(..n_out).ok_or(Error::Shape { what: What::Output, expected: n_out, actual: len })?;
    info.output.dequantize_slice(yq, y)?;
    let macs = macs(info, sel.len());
    let mut out = Selection::new();
    for c in &sel {
        // Cannot fail: both hold MAX_K (`collect` would be a panic path).
        let _ = out.push(Choice { expert: c.expert, weight: c.weight as f32 / ONE_Q15 as f32 });
    }
    Ok((out, n_out, macs))
}

/// Builds integer layer `layer` (its experts' type is `A`) and runs it on
/// quantized activations.
#[inline(always)]
fn run_q<A: IntKernel + Elem>(
    t: &Table<'_>,
    layer: usize,
    info: &LayerInfo,
    at: &LayerAt,
    x: &[A],
    y: &mut [A],
    scratch: &mut [u8],
) -> Result<Selection<i32>>
where
    A::Bias: Elem,
{
    int_layer::<A, false>(t, layer, info, at)?.infer(x, y, scratch)
}

/// [`run_q`] for [`Model::infer_int`](super::Model::infer_int): `x` is
/// the layer's input, `y` its output.
#[inline(never)]
pub(crate) fn run_int_only<A: IntKernel + Elem>(
    t: &Table<'_>,
    layer: usize,
    info: &LayerInfo,
    x: &[A],
    y: &mut [A],
    scratch: &mut [u8],
) -> Result<()>
where
    A::Bias: Elem,
{
    let at = &locate(t, layer, info);
    run_q(t, layer, info, at, x, y, scratch).map(|_| ())
}

/// Multiply-accumulates of one token with `chosen` experts, and with every
/// expert active, from the record (every routed expert has its shape): the
/// layers' `macs` without building the chosen experts' views again.
fn macs(info: &LayerInfo, chosen: usize) -> (u64, u64) {
    let buffers = if info.flags & flags::GATED != 0 { 2 } else { 1 };
    let (i, o) = (info.in_dim as u64, info.out_dim as u64);
    let ffn = |h: usize| buffers * i * h as u64 + h as u64 * o;
    let shared = if info.flags & flags::SHARED != 0 {
        ffn(info.shared_hidden) + if info.flags & flags::SHARED_GATE != 0 { i } else { 0 }
    } else {
        0
    };
    let (base, expert) = (info.experts as u64 * i + shared, ffn(info.hidden));
    (base + chosen as u64 * expert, base + info.experts as u64 * expert)
}

/// Quantization of an integer layer's combine, read from its record.
pub(crate) fn combine(expert_zp: i32, multiplier: i32, shift: i32, out_zp: i32) -> Combine {
    Combine { expert_zp, multiplier: Multiplier { multiplier, shift }, out_zp }
}
