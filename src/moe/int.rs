//! The integer MoE layer: int8 or Q15 from gate to combine, no float; or
//! with a float gate (f32 / f16 weights over the dequantized input) routing
//! integer experts.

use crate::error::{Error, Result, What, check_dim, check_len};
use crate::expert::QExpert;
use crate::kernels::{IntKernel, Linear, QLinear, expand_words};
use crate::quant::{Multiplier, QuantParams, WIDE_MAX_SHIFT, f16, requantize_wide};
#[cfg(any(feature = "f32", feature = "f16"))]
use crate::router::Choice;
use crate::router::{IntRouter, LOGIT_FRAC_BITS, ONE_Q15, Router, Rule, Selection, sigmoid_q30};
use crate::scratch::{Carve, bytes_for};

use super::{Dims, ExpertSource, Stats};

/// How expert outputs are summed: every expert (and the shared one) emits
/// values with zero point `expert_zp` and one common scale `s_e`; the sum
/// `acc = sum_i w_i (y_i - expert_zp)` with Q15 weights `w_i` is scaled by
/// `multiplier = s_e / (s_out * 2^15)` ([`requantize_wide`]) and offset by
/// `out_zp`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Combine {
    /// Zero point of every expert's output.
    pub expert_zp: i32,
    /// `s_e / (s_out * 2^15)`.
    pub multiplier: Multiplier,
    /// Zero point of the layer's output.
    pub out_zp: i32,
}

/// An always-on integer expert, optionally scaled by `sigmoid(gate x)`;
/// `gate` has one row and emits a fixed-point logit (zero point 0,
/// scale `2^-LOGIT_FRAC_BITS`).
#[derive(Debug, Clone, Copy)]
pub struct QSharedExpert<'a, A: IntKernel> {
    /// The expert.
    pub expert: QExpert<'a, A>,
    /// `(1, in)`; `None` adds the expert with weight 1.
    pub gate: Option<QLinear<'a, A>>,
}

/// Where an integer layer finds its always-on shared expert: held in the
/// layer (`Option<QSharedExpert>`, what [`QMoeLayer::new`] takes), or made
/// on demand from a parsed model's bytes, so that a layer's RAM does not
/// carry a shared expert's views, nor room for one it does not have.
pub trait SharedSource<'a, A: IntKernel> {
    /// Whether the layer has a shared expert.
    fn has_shared(&self) -> bool;

    /// The shared expert with its gate, if the layer has one, or why it
    /// cannot be had (an error of the inference, never a skipped expert).
    fn shared(&self) -> Result<Option<QSharedExpert<'a, A>>>;
}

impl<'a, A: IntKernel> SharedSource<'a, A> for Option<QSharedExpert<'a, A>> {
    fn has_shared(&self) -> bool {
        self.is_some()
    }

    fn shared(&self) -> Result<Option<QSharedExpert<'a, A>>> {
        Ok(*self)
    }
}

/// Float gate weights of a mixed layer.
#[derive(Debug, Clone, Copy)]
pub enum FloatGate<'a> {
    /// f32 weights.
    F32(Linear<'a, f32>),
    /// f16 weights.
    F16(Linear<'a, f16>),
}

impl FloatGate<'_> {
    fn rows(&self) -> usize {
        match self {
            FloatGate::F32(l) => l.rows(),
            FloatGate::F16(l) => l.rows(),
        }
    }

    fn cols(&self) -> usize {
        match self {
            FloatGate::F32(l) => l.cols(),
            FloatGate::F16(l) => l.cols(),
        }
    }

    #[cfg(any(feature = "f32", feature = "f16"))]
    fn forward(&self, x: &[f32], y: &mut [f32]) {
        match self {
            FloatGate::F32(l) => l.forward(x, y),
            FloatGate::F16(l) => l.forward(x, y),
        }
    }
}

/// How an integer layer routes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gate<'a, A: IntKernel> {
    /// Integer gate and router: the same bits on every target.
    Int(QLinear<'a, A>, IntRouter<'a>),
    /// Float gate over the dequantized input, float router; weights then Q15.
    Float(FloatGate<'a>, Router<'a>, QuantParams),
}

impl<A: IntKernel> Gate<'_, A> {
    fn rule(&self) -> &Rule {
        match self {
            Gate::Int(_, r) => r.rule(),
            Gate::Float(_, r, _) => r.rule(),
        }
    }

    pub(crate) fn cols(&self) -> usize {
        match self {
            Gate::Int(g, _) => g.cols(),
            Gate::Float(g, _, _) => g.cols(),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Gate::Int(g, _) => g.rows(),
            Gate::Float(g, _, _) => g.rows(),
        }
    }

    pub(crate) fn input_zp(&self) -> i32 {
        match self {
            Gate::Int(g, _) => g.input_zp(),
            Gate::Float(_, _, p) => p.zero_point,
        }
    }
}

/// A sparse MoE layer on the integer path (`A = i8`: int8, `A = i16`: Q15).
/// The gate emits fixed-point logits (zero point 0, scale
/// `2^-LOGIT_FRAC_BITS`) for the [`IntRouter`].
#[derive(Debug, Clone, Copy)]
pub struct QMoeLayer<'a, A: IntKernel, S = &'a [QExpert<'a, A>], H = Option<QSharedExpert<'a, A>>> {
    gate: Gate<'a, A>,
    experts: S,
    shared: H,
    combine: Combine,
    out_dim: usize,
    hidden_max: usize,
    macs_experts: u64,
}

impl<'a, A: IntKernel, S: ExpertSource<Expert = QExpert<'a, A>>> QMoeLayer<'a, A, S> {
    /// Checks shapes as [`MoeLayer::new`](super::MoeLayer::new) does, and that
    /// the quantization chains: every expert reads the gate's input zero
    /// point and writes `combine.expert_zp`; logits have zero point 0.
    pub fn new(
        gate: QLinear<'a, A>,
        router: IntRouter<'a>,
        experts: S,
        shared: Option<QSharedExpert<'a, A>>,
        combine: Combine,
    ) -> Result<Self> {
        Self::with_gate(Gate::Int(gate, router), experts, shared, combine)
    }

    /// A layer whose gate is float (`gate` over the input dequantized with
    /// `input`, then `router`) and whose experts are integer. Routing then
    /// follows float arithmetic (IEEE, the same on every target with
    /// micromoe's software `libm`), and the chosen weights become Q15.
    /// A build without the `f32` and `f16` features refuses such a layer at
    /// inference ([`Error::Disabled`]).
    pub fn with_float_gate(
        gate: FloatGate<'a>,
        router: Router<'a>,
        input: QuantParams,
        experts: S,
        shared: Option<QSharedExpert<'a, A>>,
        combine: Combine,
    ) -> Result<Self> {
        Self::with_gate(Gate::Float(gate, router, input), experts, shared, combine)
    }

    fn with_gate(
        gate: Gate<'a, A>,
        experts: S,
        shared: Option<QSharedExpert<'a, A>>,
        combine: Combine,
    ) -> Result<Self> {
        check_parts(&gate, experts.count(), &combine)?;
        let out_dim = experts.expert(0).map_or(0, |e| e.out_dim());
        let (input, output) = ((gate.cols(), gate.input_zp()), (out_dim, combine.expert_zp));
        let (mut hidden_max, mut macs_experts) = (0, 0);
        for i in 0..experts.count() {
            let e = experts.expert(i)?;
            check_expert(&e, input, output)?;
            hidden_max = hidden_max.max(e.hidden_len());
            macs_experts += e.macs();
        }
        if let Some(s) = &shared {
            check_shared(s, input, output)?;
            hidden_max = hidden_max.max(s.expert.hidden_len());
        }
        Ok(Self::from_dims(gate, experts, shared, combine, Dims { out_dim, hidden_max, macs_experts }))
    }

    /// The shared expert, if any.
    pub fn shared(&self) -> Option<&QSharedExpert<'a, A>> {
        self.shared.as_ref()
    }
}

impl<'a, A: IntKernel, S: ExpertSource<Expert = QExpert<'a, A>>, H: SharedSource<'a, A>>
    QMoeLayer<'a, A, S, H>
{
    /// A layer over parts that were checked before (a parsed model), with
    /// the sizes its records give: no walk over every expert.
    pub(crate) fn from_dims(gate: Gate<'a, A>, experts: S, shared: H, combine: Combine, dims: Dims) -> Self {
        let Dims { out_dim, hidden_max, macs_experts } = dims;
        QMoeLayer { gate, experts, shared, combine, out_dim, hidden_max, macs_experts }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.gate.cols()
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Expert outputs kept at once: the k routed plus the shared one.
    fn slots(&self) -> usize {
        self.gate.rule().k + 1
    }

    /// Bytes of scratch [`QMoeLayer::infer`] needs.
    pub fn scratch_bytes(&self) -> usize {
        let float_input = match self.gate {
            Gate::Float(..) => bytes_for::<f32>(self.in_dim()),
            Gate::Int(..) => 0,
        };
        float_input
            + bytes_for::<i32>(self.gate.rule().experts)
            + bytes_for::<A>(self.hidden_max)
            + bytes_for::<A>(self.slots().saturating_mul(self.out_dim))
            + bytes_for::<u32>(self.work_words())
    }

    /// Words of kernel work buffer ([`expand_words`] of the widest input
    /// any product of the layer reads).
    fn work_words(&self) -> usize {
        expand_words(self.in_dim().max(self.hidden_max))
    }

    /// Multiply-accumulates for one token with the given experts chosen,
    /// and with all of them (dense).
    pub fn macs(&self, sel: &Selection<i32>) -> (u64, u64) {
        let base = (self.gate.rows() * self.gate.cols()) as u64
            + self
                .shared
                .shared()
                .ok()
                .flatten()
                .map_or(0, |s| s.expert.macs() + s.gate.map_or(0, |g| g.cols() as u64));
        let chosen: u64 =
            sel.iter().map(|c| self.experts.expert(c.expert as usize).map_or(0, |e| e.macs())).sum();
        (base + chosen, base + self.macs_experts)
    }

    /// Runs one quantized token. Returns the experts chosen with Q15 weights.
    pub fn infer(&self, x: &[A], out: &mut [A], scratch: &mut [u8]) -> Result<Selection<i32>> {
        check_len(What::Input, self.in_dim(), x.len())?;
        check_len(What::Output, self.out_dim, out.len())?;
        let mut carve = Carve::new(scratch);
        let work = carve.take::<u32>(self.work_words())?;
        let sel = self.route(x, &mut carve, work)?;
        let hidden = carve.take::<A>(self.hidden_max)?;
        let ys = carve.take::<A>(self.slots() * self.out_dim)?;

        // ys: (k + 1, out); weights: Q15, the shared expert's last.
        let mut rows = heapless::Vec::<(&[A], i32), { crate::router::MAX_K + 1 }>::new();
        let short = Error::ScratchTooSmall { needed: self.slots() * self.out_dim, actual: ys.len() };
        let mut slots = ys.chunks_exact_mut(self.out_dim.max(1));
        for c in &sel {
            let expert = self.experts.expert(c.expert as usize)?;
            let y = slots.next().ok_or(short)?;
            expert.forward_in(x, y, hidden, work);
            let _ = rows.push((&*y, c.weight));
        }
        if self.shared.has_shared() {
            let y = slots.next().ok_or(short)?;
            let w = self.run_shared(x, y, hidden, work)?;
            let _ = rows.push((&*y, w));
        }
        self.combine(&rows, out);
        Ok(sel)
    }

    /// Chooses experts for one token, with Q15 weights; work buffers from
    /// `carve`, the kernels' from `work`.
    pub(crate) fn route(&self, x: &[A], carve: &mut Carve<'_>, work: &mut [u32]) -> Result<Selection<i32>> {
        let n = self.gate.rule().experts;
        let mut sel = Selection::new();
        match &self.gate {
            Gate::Int(gate, router) => {
                // logits: (experts,) in Q.LOGIT_FRAC_BITS = gate (experts, in) @ x
                let logits = carve.take::<i32>(n)?;
                gate.forward_wide_in(x, logits, work);
                router.route(logits, &mut sel)?;
            }
            // Without a float type the float router is not linked: such a
            // layer (made by `with_float_gate`) is refused here; `Model::parse`
            // refuses it before.
            #[cfg(not(any(feature = "f32", feature = "f16")))]
            Gate::Float(..) => return Err(Error::Disabled { feature: "f32" }),
            #[cfg(any(feature = "f32", feature = "f16"))]
            Gate::Float(gate, router, input) => {
                let xf = carve.take::<f32>(self.in_dim())?;
                let logits = carve.take::<f32>(n)?;
                input.dequantize_slice(x, xf)?;
                gate.forward(xf, logits);
                let mut fsel = Selection::new();
                router.route(logits, &mut fsel)?;
                let q15 = |w: f32| libm::roundf(w * ONE_Q15 as f32) as i32;
                for c in &fsel {
                    // Cannot fail: both hold MAX_K (`collect` would be a panic path).
                    let _ = sel.push(Choice { expert: c.expert, weight: q15(c.weight) });
                }
            }
        }
        Ok(sel)
    }

    /// `out = requant(sum_i w_i (y_i - expert_zp)) + out_zp` over the expert
    /// outputs `rows` (integer sums: the order does not matter).
    pub(crate) fn combine(&self, rows: &[(&[A], i32)], out: &mut [A]) {
        let Combine { expert_zp, multiplier, out_zp } = self.combine;
        for (j, o) in out.iter_mut().enumerate() {
            let acc: i64 = rows
                .iter()
                .map(|&(y, w)| w as i64 * (y.get(j).map_or(expert_zp, |v| v.get()) - expert_zp) as i64)
                .sum();
            *o = A::saturate(requantize_wide(acc, multiplier).saturating_add(out_zp));
        }
    }

    /// Scratch bytes [`QMoeLayer::route`] needs.
    #[cfg(feature = "std")]
    pub(crate) fn route_bytes(&self) -> usize {
        bytes_for::<f32>(self.in_dim()) + bytes_for::<i32>(self.gate.rule().experts)
    }

    /// Values of `A` the largest expert's hidden buffers take.
    #[cfg(feature = "std")]
    pub(crate) fn hidden_max(&self) -> usize {
        self.hidden_max
    }

    /// The experts.
    pub fn experts(&self) -> &S {
        &self.experts
    }

    /// The routing rule.
    pub fn rule(&self) -> &Rule {
        self.gate.rule()
    }

    /// Runs the shared expert into `y`; returns its Q15 weight. Out of line:
    /// its views live in this frame, not in every inference's.
    #[inline(never)]
    fn run_shared(&self, x: &[A], y: &mut [A], hidden: &mut [A], work: &mut [u32]) -> Result<i32> {
        // `has_shared` said there is one; were it not, the shared slot is
        // the one after the routed experts.
        let missing = Error::OutOfRange { what: What::Experts, index: self.gate.rule().experts };
        let shared = self.shared.shared()?.ok_or(missing)?;
        shared.expert.forward_in(x, y, hidden, work);
        Ok(shared_weight(&shared, x, work))
    }

    /// Where the shared expert comes from.
    pub fn shared_source(&self) -> &H {
        &self.shared
    }

    /// [`QMoeLayer::infer`], and records the choice and the work in `stats`.
    pub fn infer_with_stats<const N: usize>(
        &self,
        x: &[A],
        out: &mut [A],
        scratch: &mut [u8],
        stats: &mut Stats<N>,
    ) -> Result<Selection<i32>> {
        stats.check(self.gate.rule().experts)?;
        let sel = self.infer(x, out, scratch)?;
        let (macs, dense) = self.macs(&sel);
        stats.record(&sel, macs, dense);
        Ok(sel)
    }
}

/// The shared expert's Q15 weight for `x`: `sigmoid(shared_gate x)` or 1.
pub(crate) fn shared_weight<A: IntKernel>(shared: &QSharedExpert<'_, A>, x: &[A], work: &mut [u32]) -> i32 {
    match shared.gate.as_ref() {
        Some(gate) => {
            let mut l = [0i32];
            gate.forward_wide_in(x, &mut l, work);
            ((sigmoid_q30(l[0], LOGIT_FRAC_BITS) + (1 << 14)) >> 15) as i32
        }
        None => ONE_Q15,
    }
}

/// What a layer needs of its parts beside the experts: `experts` sources
/// for the gate's rows, logits with zero point 0, an output zero point of
/// the type and a combine multiplier in range.
pub(crate) fn check_parts<A: IntKernel>(gate: &Gate<'_, A>, experts: usize, combine: &Combine) -> Result<()> {
    let n = gate.rule().experts;
    check_len(What::Experts, n, experts)?;
    check_dim(What::Experts, n, gate.rows())?;
    let zp_err = Error::OutOfRange { what: What::ZeroPoint, index: 0 };
    if matches!(gate, Gate::Int(g, _) if g.output_zp() != 0) || !(A::MIN..=A::MAX).contains(&combine.out_zp) {
        return Err(zp_err);
    }
    let m = combine.multiplier;
    if Multiplier::new(m.multiplier, m.shift).is_err() || m.shift > WIDE_MAX_SHIFT {
        return Err(Error::OutOfRange { what: What::Requant, index: 0 });
    }
    Ok(())
}

/// An expert of a layer whose input has `(width, zero point)` = `input`
/// and whose experts emit `(width, zero point)` = `output`.
pub(crate) fn check_expert<A: IntKernel>(
    e: &QExpert<'_, A>,
    input: (usize, i32),
    output: (usize, i32),
) -> Result<()> {
    check_dim(What::Input, input.0, e.in_dim())?;
    check_dim(What::Output, output.0, e.out_dim())?;
    if e.input_zp() != input.1 || e.down().output_zp() != output.1 {
        return Err(Error::OutOfRange { what: What::ZeroPoint, index: 0 });
    }
    Ok(())
}

/// A shared expert, as [`check_expert`], and its gate: one row over the
/// layer's input, logits with zero point 0.
pub(crate) fn check_shared<A: IntKernel>(
    s: &QSharedExpert<'_, A>,
    input: (usize, i32),
    output: (usize, i32),
) -> Result<()> {
    check_expert(&s.expert, input, output)?;
    if let Some(g) = s.gate.as_ref() {
        check_dim(What::Weight, 1, g.rows())?;
        check_dim(What::Input, input.0, g.cols())?;
        if g.input_zp() != input.1 || g.output_zp() != 0 {
            return Err(Error::OutOfRange { what: What::ZeroPoint, index: 0 });
        }
    }
    Ok(())
}
