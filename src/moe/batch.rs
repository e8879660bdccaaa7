//! Many tokens at once on the CPU (`std`), float or integer: route every token, group the
//! tokens by expert ([`DispatchPlan`]), run each expert over its group with
//! the experts spread across threads, then combine each token's outputs in
//! router order, so the result is bit-identical to running token by token.
//!
//! ```
//! use micromoe::kernels::Activation;
//! use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
//! use micromoe::Rule;
//! let lin = |v: f32, rows, cols| LinearBuf::new(vec![v; rows * cols], None, rows, cols);
//! let experts = vec![
//!     ExpertBuf::mlp(lin(0.5, 4, 2), lin(0.25, 2, 4), Activation::Relu),
//!     ExpertBuf::mlp(lin(-0.5, 4, 2), lin(0.25, 2, 4), Activation::Relu),
//! ];
//! let model = MoeBuf::new(LinearBuf::new(vec![1.0, 1.0, -1.0, -1.0], None, 2, 2), experts, Rule::switch(2));
//! let views = model.expert_views().unwrap();
//! let layer = model.layer(&views).unwrap();
//! let xs = [1.0, 2.0, -1.0, -3.0, 0.5, 0.5]; // 3 tokens
//! let mut out = [0.0f32; 6];
//! let chosen = layer.infer_batch(&xs, &mut out, 2).unwrap();
//! assert_eq!((chosen[0][0].expert, chosen[1][0].expert), (0, 1));
//! ```

use std::vec;
use std::vec::Vec;

use super::{ExpertSource, MoeLayer, QMoeLayer, SharedSource};
use crate::error::{Error, Result, What, check_finite, check_len};
use crate::expert::{Expert, QExpert};
use crate::kernels::{FloatWeight, IntKernel, expand_words};
use crate::router::{DispatchPlan, Selection};
use crate::scratch::Carve;

impl<'a, G, W, S> MoeLayer<'a, G, W, S>
where
    G: FloatWeight + Sync,
    W: FloatWeight + Sync,
    S: ExpertSource<Expert = Expert<'a, W>> + Sync,
{
    /// Runs a batch: `xs` is `(tokens, in)`, `out` `(tokens, out)`, both
    /// row-major; `threads` workers (at least 1) share the experts. Returns
    /// each token's choice. The same numbers, bit for bit, as
    /// [`MoeLayer::infer`] token by token.
    pub fn infer_batch(&self, xs: &[f32], out: &mut [f32], threads: usize) -> Result<Vec<Selection<f32>>> {
        let (d_in, d_out) = (self.in_dim(), self.out_dim());
        if xs.is_empty() || !xs.len().is_multiple_of(d_in) {
            return Err(Error::Shape { what: What::Input, expected: d_in, actual: xs.len() });
        }
        let n = xs.len() / d_in;
        check_len(What::Output, n * d_out, out.len())?;
        check_finite(What::Input, xs)?;
        let experts = self.router().rule().experts;

        // Route every token.
        let mut logits = vec![0.0f32; experts];
        let mut selections = Vec::with_capacity(n);
        for x in xs.chunks_exact(d_in) {
            self.gate().forward(x, &mut logits);
            let mut sel = Selection::new();
            self.router().route(&logits, &mut sel)?;
            selections.push(sel);
        }
        let plan = DispatchPlan::new(&selections, experts)?;

        // ys: (entries, out) in plan order; each expert's rows are contiguous.
        let hidden_len = self.hidden_max();
        // Every expert with tokens, resolved before any runs: one that cannot
        // be had is the batch's error, not a skipped expert.
        let views = resolve(&plan, |e| self.experts().expert(e))?;
        let ys = run_groups(&plan, d_out, threads, 0.0f32, |e, group, ys| {
            let Some(Some(expert)) = views.get(e) else { return };
            // The group's tokens gathered, then one matrix product per weight.
            let mut gathered = Vec::with_capacity(group.len() * d_in);
            for &t in group {
                gathered.extend_from_slice(&xs[t as usize * d_in..(t as usize + 1) * d_in]);
            }
            let mut hidden = vec![0.0f32; hidden_len * group.len()];
            expert.forward_batch(&gathered, ys, &mut hidden);
        });
        let k = self.router().rule().k;
        let entry = entries(&plan, n, k);
        let mut hidden = vec![0.0f32; hidden_len];
        let mut shared_y = vec![0.0f32; d_out];
        for (t, (o, sel)) in out.chunks_exact_mut(d_out).zip(&selections).enumerate() {
            // Router order, as `infer` sums: the same bits.
            o.fill(0.0);
            for (slot, c) in sel.iter().enumerate() {
                let Some(y) = row(&ys, entry[t * k + slot], d_out) else { continue };
                for (v, &yv) in o.iter_mut().zip(y) {
                    *v += c.weight * yv;
                }
            }
            super::add_shared(self, &mut &xs[t * d_in..(t + 1) * d_in], o, &mut shared_y, &mut hidden);
        }
        Ok(selections)
    }
}

impl<'a, A, S, H> QMoeLayer<'a, A, S, H>
where
    A: IntKernel + Send + Sync,
    A::Bias: Sync,
    S: ExpertSource<Expert = QExpert<'a, A>> + Sync,
    H: SharedSource<'a, A>,
{
    /// Runs a batch of quantized tokens: `xs` `(tokens, in)`, `out`
    /// `(tokens, out)`; the same bits as [`QMoeLayer::infer`] token by token.
    pub fn infer_batch(&self, xs: &[A], out: &mut [A], threads: usize) -> Result<Vec<Selection<i32>>> {
        let (d_in, d_out) = (self.in_dim(), self.out_dim());
        if xs.is_empty() || !xs.len().is_multiple_of(d_in) {
            return Err(Error::Shape { what: What::Input, expected: d_in, actual: xs.len() });
        }
        let n = xs.len() / d_in;
        check_len(What::Output, n * d_out, out.len())?;
        let experts = self.rule().experts;
        let mut route_scratch = vec![0u8; self.route_bytes()];
        let mut work = vec![0u32; expand_words(d_in.max(self.hidden_max()))];
        let selections = xs
            .chunks_exact(d_in)
            .map(|x| self.route(x, &mut Carve::new(&mut route_scratch), &mut work))
            .collect::<Result<Vec<_>>>()?;
        let plan = DispatchPlan::new(&selections, experts)?;
        let hidden_len = self.hidden_max();
        let views = resolve(&plan, |e| self.experts().expert(e))?;
        let ys = run_groups(&plan, d_out, threads, A::default(), |e, group, ys| {
            let mut hidden = vec![A::default(); hidden_len];
            let Some(Some(expert)) = views.get(e) else { return };
            for (&t, y) in group.iter().zip(ys.chunks_exact_mut(d_out)) {
                expert.forward(&xs[t as usize * d_in..(t as usize + 1) * d_in], y, &mut hidden);
            }
        });
        let entry = entries(&plan, n, self.rule().k);
        let mut hidden = vec![A::default(); hidden_len];
        let mut shared_y = vec![A::default(); d_out];
        for (t, (o, sel)) in out.chunks_exact_mut(d_out).zip(&selections).enumerate() {
            let x = &xs[t * d_in..(t + 1) * d_in];
            let mut rows: Vec<(&[A], i32)> = sel
                .iter()
                .enumerate()
                .filter_map(|(slot, c)| {
                    row(&ys, entry[t * self.rule().k + slot], d_out).map(|y| (y, c.weight))
                })
                .collect();
            if let Some(shared) = self.shared_source().shared()? {
                shared.expert.forward(x, &mut shared_y, &mut hidden);
                rows.push((&shared_y, super::int::shared_weight(&shared, x, &mut work)));
            }
            self.combine(&rows, o);
        }
        Ok(selections)
    }
}

/// The view of every expert the plan gives tokens to (`None` for the rest).
pub(crate) fn resolve<E>(
    plan: &DispatchPlan<impl Copy + Default>,
    expert: impl Fn(usize) -> Result<E>,
) -> Result<Vec<Option<E>>> {
    (0..plan.experts()).map(|e| (!plan.group(e).tokens.is_empty()).then(|| expert(e)).transpose()).collect()
}

/// Runs `work(expert, tokens, rows)` for every expert's group of the plan,
/// the experts spread over `threads` workers; returns the rows, `(entries,
/// width)` in plan order.
pub(crate) fn run_groups<T: Copy + Send>(
    plan: &DispatchPlan<impl Copy + Default + Sync>,
    width: usize,
    threads: usize,
    zero: T,
    work: impl Fn(usize, &[u32], &mut [T]) + Sync,
) -> Vec<T> {
    let experts = plan.experts();
    let mut ys = vec![zero; plan.tokens.len() * width];
    // Experts with tokens, the busiest first, each to the least loaded thread.
    let mut groups: Vec<(usize, &mut [T])> = Vec::new();
    let mut rest = ys.as_mut_slice();
    for e in 0..experts {
        let (mine, tail) = rest.split_at_mut(plan.group(e).tokens.len() * width);
        if !mine.is_empty() {
            groups.push((e, mine));
        }
        rest = tail;
    }
    groups.sort_by_key(|(e, _)| core::cmp::Reverse(plan.group(*e).tokens.len()));
    let threads = threads.clamp(1, groups.len().max(1));
    // (tokens so far, groups) per thread.
    type List<'a, T> = Vec<(usize, &'a mut [T])>;
    let mut lists: Vec<(usize, List<'_, T>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for (e, rows) in groups {
        if let Some(list) = lists.iter_mut().min_by_key(|(load, _)| *load) {
            list.0 += plan.group(e).tokens.len();
            list.1.push((e, rows));
        }
    }
    spread(lists.into_iter().map(|(_, list)| list), |list: List<'_, T>| {
        for (e, rows) in list {
            work(e, plan.group(e).tokens, rows);
        }
    });
    ys
}

/// `run(part)` for every part, each on a thread of its own but the first,
/// which runs on this one (one spawn fewer per call); returns when all are
/// done.
pub(crate) fn spread<P: Send>(parts: impl IntoIterator<Item = P>, run: impl Fn(P) + Sync) {
    let mut parts = parts.into_iter();
    let first = parts.next();
    let run = &run;
    std::thread::scope(|scope| {
        for part in parts {
            scope.spawn(move || run(part));
        }
        if let Some(part) = first {
            run(part);
        }
    });
}

/// `entry[t * k + slot]`: where token `t`'s choice `slot` is in the plan.
pub(crate) fn entries<W: Copy + Default>(plan: &DispatchPlan<W>, tokens: usize, k: usize) -> Vec<usize> {
    let mut entry = vec![usize::MAX; tokens * k];
    for (i, (&t, &slot)) in plan.tokens.iter().zip(&plan.slots).enumerate() {
        if let Some(e) = entry.get_mut(t as usize * k + slot as usize) {
            *e = i;
        }
    }
    entry
}

/// Row `i` of a `(rows, width)` buffer.
pub(crate) fn row<T>(ys: &[T], i: usize, width: usize) -> Option<&[T]> {
    ys.get(i.checked_mul(width)?..)?.get(..width)
}
