//! Many tokens at once on the CPU (`std`): route every token, group the
//! tokens by expert ([`DispatchPlan`]), run each expert over its group with
//! the experts spread across threads, then combine each token's outputs in
//! router order, so the result is bit-identical to running token by token.
//!
//! ```
//! use micromoe::kernels::Activation;
//! use micromoe::moe::owned::{ExpertBuf, LinearBuf, MoeBuf};
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

use super::{ExpertSource, MoeLayer};
use crate::error::{Error, Result, What, check_finite, check_len};
use crate::expert::Expert;
use crate::kernels::FloatWeight;
use crate::router::{DispatchPlan, Selection};

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
        let mut ys = vec![0.0f32; plan.tokens.len() * d_out];
        let mut chunks: Vec<(usize, &mut [f32])> = Vec::with_capacity(experts);
        let mut rest = ys.as_mut_slice();
        for e in 0..experts {
            let (mine, tail) = rest.split_at_mut(plan.group(e).tokens.len() * d_out);
            chunks.push((e, mine));
            rest = tail;
        }
        let threads = threads.clamp(1, experts.max(1));
        let mut work: Vec<Vec<(usize, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, chunk) in chunks.into_iter().enumerate() {
            work[i % threads].push(chunk);
        }
        let hidden_len = self.hidden_max();
        std::thread::scope(|scope| {
            for list in work {
                let plan = &plan;
                scope.spawn(move || {
                    let mut hidden = vec![0.0f32; hidden_len];
                    for (e, ys) in list {
                        let Some(expert) = self.experts().expert(e) else { continue };
                        for (&t, y) in plan.group(e).tokens.iter().zip(ys.chunks_exact_mut(d_out)) {
                            let x = &xs[t as usize * d_in..(t as usize + 1) * d_in];
                            expert.forward(x, y, &mut hidden);
                        }
                    }
                });
            }
        });

        // Where each (token, choice) landed in `ys`.
        let k = self.router().rule().k;
        let mut entry = vec![usize::MAX; n * k];
        for (i, (&t, &slot)) in plan.tokens.iter().zip(&plan.slots).enumerate() {
            entry[t as usize * k + slot as usize] = i;
        }
        let mut hidden = vec![0.0f32; hidden_len];
        let mut shared_y = vec![0.0f32; d_out];
        for (t, (o, sel)) in out.chunks_exact_mut(d_out).zip(&selections).enumerate() {
            o.fill(0.0);
            for (slot, c) in sel.iter().enumerate() {
                let Some(y) = ys.get(entry[t * k + slot] * d_out..).and_then(|y| y.get(..d_out)) else {
                    continue;
                };
                for (v, &yv) in o.iter_mut().zip(y) {
                    *v += c.weight * yv;
                }
            }
            self.add_shared(&xs[t * d_in..(t + 1) * d_in], o, &mut shared_y, &mut hidden);
        }
        Ok(selections)
    }
}
