//! The f32 / f16 MoE layer.

use crate::error::{Result, What, check_dim, check_finite, check_len};
use crate::expert::Expert;
use crate::kernels::{FloatWeight, Linear};
use crate::router::{Router, Selection};
use crate::scratch::{Carve, bytes_for};

use super::{Dims, ExpertSource, Parts, Stats};

/// An always-on expert, optionally scaled by `sigmoid(gate x)` (`gate`: one
/// row, Qwen2-MoE's `shared_expert_gate`).
#[derive(Debug, Clone, Copy)]
pub struct SharedExpert<'a, W> {
    /// The expert.
    pub expert: Expert<'a, W>,
    /// `(1, in)`; `None` adds the expert unscaled (DeepSeek).
    pub gate: Option<Linear<'a, W>>,
}

/// A sparse MoE layer with f32 or f16 weights: gate weights `G`, expert
/// weights `W` (e.g. an f32 router over f16 experts), experts from `S` (a
/// slice of views, or views made on demand from model bytes).
#[derive(Debug, Clone, Copy)]
pub struct MoeLayer<'a, G, W, S = &'a [Expert<'a, W>]> {
    gate: Linear<'a, G>,
    router: Router<'a>,
    experts: S,
    shared: Option<SharedExpert<'a, W>>,
    in_dim: usize,
    out_dim: usize,
    hidden_max: usize,
    macs_experts: u64,
}

impl<'a, G: FloatWeight, W: FloatWeight, S: ExpertSource<Expert = Expert<'a, W>>> MoeLayer<'a, G, W, S> {
    /// Checks that the gate has one row per expert and that every expert
    /// (and the shared one) has the gate's input width and one output width.
    pub fn new(
        gate: Linear<'a, G>,
        router: Router<'a>,
        experts: S,
        shared: Option<SharedExpert<'a, W>>,
    ) -> Result<Self> {
        let n = router.rule().experts;
        check_len(What::Experts, n, experts.count())?;
        check_dim(What::Experts, n, gate.rows())?;
        let in_dim = gate.cols();
        let out_dim = experts.expert(0).map_or(0, |e| e.ffn().out_dim());
        let (mut hidden_max, mut macs_experts) = (0, 0);
        let routed = (0..n).map(|i| experts.expert(i));
        for (i, e) in routed.chain(shared.as_ref().map(|s| Ok(s.expert))).enumerate() {
            let e = e?;
            check_dim(What::Input, in_dim, e.ffn().in_dim())?;
            check_dim(What::Output, out_dim, e.ffn().out_dim())?;
            hidden_max = hidden_max.max(e.hidden_len());
            if i < n {
                macs_experts += e.ffn().macs();
            }
        }
        if let Some(g) = shared.as_ref().and_then(|s| s.gate.as_ref()) {
            check_dim(What::Weight, 1, g.rows())?;
            check_dim(What::Input, in_dim, g.cols())?;
        }
        Ok(Self::from_dims(gate, router, experts, shared, Dims { out_dim, hidden_max, macs_experts }))
    }

    /// A layer over parts that were checked before (a parsed model), with
    /// the sizes its records give: no walk over every expert.
    pub(crate) fn from_dims(
        gate: Linear<'a, G>,
        router: Router<'a>,
        experts: S,
        shared: Option<SharedExpert<'a, W>>,
        dims: Dims,
    ) -> Self {
        let Dims { out_dim, hidden_max, macs_experts } = dims;
        MoeLayer { gate, router, experts, shared, in_dim: gate.cols(), out_dim, hidden_max, macs_experts }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// The gate, `(experts, in)`.
    pub fn gate(&self) -> &Linear<'a, G> {
        &self.gate
    }

    /// The router.
    pub fn router(&self) -> &Router<'a> {
        &self.router
    }

    /// The routed experts.
    pub fn experts(&self) -> &S {
        &self.experts
    }

    /// The shared expert, if any.
    pub fn shared(&self) -> Option<&SharedExpert<'a, W>> {
        self.shared.as_ref()
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Bytes of scratch [`MoeLayer::infer`] needs.
    pub fn scratch_bytes(&self) -> usize {
        bytes_for::<f32>(self.router.rule().experts)
            + bytes_for::<f32>(self.hidden_max)
            + bytes_for::<f32>(self.out_dim)
    }

    /// Multiply-accumulates for one token with the given experts chosen, and
    /// with all of them (dense).
    pub fn macs(&self, sel: &Selection<f32>) -> (u64, u64) {
        let base = (self.gate.rows() * self.gate.cols()) as u64
            + self
                .shared
                .as_ref()
                .map_or(0, |s| s.expert.ffn().macs() + s.gate.map_or(0, |g| g.cols() as u64));
        let chosen: u64 =
            sel.iter().map(|c| self.experts.expert(c.expert as usize).map_or(0, |e| e.ffn().macs())).sum();
        (base + chosen, base + self.macs_experts)
    }

    /// Runs one token: `out = sum_i w_i expert_i(x) (+ shared)`. Returns the
    /// experts chosen. `x` must be finite ([`Error::NonFinite`](crate::Error::NonFinite) otherwise).
    pub fn infer(&self, x: &[f32], out: &mut [f32], scratch: &mut [u8]) -> Result<Selection<f32>> {
        check_len(What::Input, self.in_dim, x.len())?;
        check_len(What::Output, self.out_dim, out.len())?;
        check_finite(What::Input, x)?;
        let mut carve = Carve::new(scratch);
        let logits = carve.take::<f32>(self.router.rule().experts)?;
        let hidden = carve.take::<f32>(self.hidden_max)?;
        let y = carve.take::<f32>(self.out_dim)?;
        super::forward(self, Some(&self.router), &mut { x }, out, (logits, y), hidden)
    }

    /// f32 values of the largest expert's hidden buffers.
    #[cfg(feature = "std")]
    pub(crate) fn hidden_max(&self) -> usize {
        self.hidden_max
    }

    /// [`MoeLayer::infer`], and records the choice and the work in `stats`.
    pub fn infer_with_stats<const N: usize>(
        &self,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut [u8],
        stats: &mut Stats<N>,
    ) -> Result<Selection<f32>> {
        stats.check(self.router.rule().experts)?;
        let sel = self.infer(x, out, scratch)?;
        let (macs, dense) = self.macs(&sel);
        stats.record(&sel, macs, dense);
        Ok(sel)
    }
}

impl<'a, 'x, G, W, S> Parts<&'x [f32], [f32]> for MoeLayer<'a, G, W, S>
where
    G: FloatWeight,
    W: FloatWeight,
    S: ExpertSource<Expert = Expert<'a, W>>,
{
    #[inline(always)]
    fn logits(&self, x: &mut &'x [f32], logits: &mut [f32]) {
        self.gate.forward(x, logits);
    }

    #[inline(always)]
    fn expert(&self, e: usize, x: &mut &'x [f32], y: &mut [f32], hidden: &mut [f32]) -> Result<()> {
        self.experts.expert(e)?.forward(x, y, hidden);
        Ok(())
    }

    #[inline(always)]
    fn shared(&self, x: &mut &'x [f32], y: &mut [f32], hidden: &mut [f32]) -> Option<Option<f32>> {
        let shared = self.shared.as_ref()?;
        shared.expert.forward(x, y, hidden);
        Some(shared.gate.map(|gate| {
            let mut l = [0.0f32];
            gate.forward(x, &mut l);
            l[0]
        }))
    }
}
