//! The decoder's `std` paths: a prompt as one batch per layer (prefill),
//! and a step's experts (a prefill's FFN over one token) and output
//! projection over threads.
//!
//! Prefill:
//! Every matrix multiplies all prompt tokens in one pass (each weight row
//! read once for all of them), each routed expert runs once over the
//! tokens routed to it (grouped by a [`DispatchPlan`], the experts spread
//! over threads as the batched layers do), the shared expert once over all; attention runs per
//! token over the cache up to its position (the causal mask). The combine
//! is the one float MoE's ([`moe::forward`]) per token, over the outputs
//! computed here. Every product gives the bits of its one-token twin, so a
//! prefill gives the same logits and cache as [`Decoder::step`] over each
//! token in turn, bit for bit (tested on every committed decoder, f32, f16
//! and int8), and computes the output projection for the last token only.

use alloc::vec;
use alloc::vec::Vec;

use super::{Decoder, Layer, ResolvedDecoder, rms_norm, rope, rope_table};
use crate::error::{Error, Result, What, check_len};
use crate::expert::Batch;
use crate::model::state::{State, Work};
use crate::moe;
use crate::moe::batch::{entries, resolve, row, run_groups};
use crate::router::{DispatchPlan, Selection};

/// One token's share of a layer's FFN, computed over the batch: what
/// [`moe::forward`] combines.
struct Done<'d> {
    /// The gate's logits `(experts,)`.
    logits: &'d [f32],
    /// The token's selection, where each slot's output is in `ys` (`(entries,
    /// hidden)` in plan order), and `ys`.
    sel: &'d Selection<f32>,
    entry: &'d [usize],
    ys: &'d [f32],
    /// The shared expert's output and its gate's logit, if the layer has one.
    shared: Option<(&'d [f32], Option<f32>)>,
}

impl moe::Parts<(), ()> for Done<'_> {
    fn logits(&self, _: &mut (), logits: &mut [f32]) {
        logits.iter_mut().zip(self.logits).for_each(|(o, &v)| *o = v);
    }

    fn expert(&self, e: usize, _: &mut (), y: &mut [f32], _: &mut ()) -> Result<()> {
        // The router picks from the same logits what it picked before.
        let slot = self.sel.iter().position(|c| c.expert as usize == e).ok_or(Error::WrongState)?;
        let at = self.entry.get(slot).copied().ok_or(Error::WrongState)?;
        y.copy_from_slice(row(self.ys, at, y.len()).ok_or(Error::WrongState)?);
        Ok(())
    }

    fn shared(&self, _: &mut (), y: &mut [f32], _: &mut ()) -> Option<Option<f32>> {
        let (row, logit) = self.shared?;
        y.iter_mut().zip(row).for_each(|(o, &v)| *o = v);
        Some(logit)
    }
}

/// `rows` (each `n` wide) of `m`, gathered.
fn gather(m: &[f32], n: usize, rows: impl Iterator<Item = usize>) -> Vec<f32> {
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(&m[r * n..(r + 1) * n]);
    }
    out
}

impl<'a> Decoder<'a> {
    /// Feeds `tokens` (at least one) from the state's position as one batch
    /// per layer, stores their keys and values, advances the state past
    /// them and writes the logits after the last one to `logits` (`vocab`
    /// wide): the same bits, logits and cache, as [`Decoder::step`] over
    /// each token in turn, at a fraction of the time (each weight row read
    /// once for the whole prompt; the output projection for the last token
    /// only). The routed experts run on the decoder's threads
    /// ([`Decoder::with_threads`]; the same bits for any number).
    /// `on_layer(token, layer, selection)` sees each token's experts, layer
    /// by layer. Buffers of `tokens.len()` rows are allocated; a
    /// prompt longer than the context left is [`Error::ContextFull`] and
    /// leaves the state as it was.
    pub fn prefill(
        &self,
        state: &mut State<'_>,
        tokens: &[u32],
        logits: &mut [f32],
        on_layer: impl FnMut(usize, usize, &Selection<f32>),
    ) -> Result<()> {
        self.prefill_over(None, state, tokens, logits, on_layer)
    }

    fn prefill_over(
        &self,
        built: Option<&[Layer<'a>]>,
        state: &mut State<'_>,
        tokens: &[u32],
        logits: &mut [f32],
        mut on_layer: impl FnMut(usize, usize, &Selection<f32>),
    ) -> Result<()> {
        let c = self.cfg;
        check_len(What::Output, c.vocab, logits.len())?;
        if tokens.is_empty() {
            return Err(Error::Shape { what: What::Token, expected: 1, actual: 0 });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::OutOfRange { what: What::Token, index: t as usize });
        }
        let (n, pos) = (tokens.len(), state.pos());
        if pos.saturating_add(n) > c.context {
            return Err(Error::ContextFull { context: c.context });
        }
        let (kv, w) = state.split(&c, self.ffn)?;
        let (h, qd, kvd, hd) = (c.hidden, c.q_dim(), c.kv_dim(), c.head_dim.max(1));
        let mut x = vec![0.0f32; n * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            self.embed.row(t as usize, row);
        }
        // RoPE's angles for every position, once.
        let half = hd / 2;
        let (mut cos, mut sin) = (vec![0.0f32; n * half], vec![0.0f32; n * half]);
        for (t, (co, si)) in
            cos.chunks_exact_mut(half.max(1)).zip(sin.chunks_exact_mut(half.max(1))).enumerate()
        {
            rope_table(pos + t, w.inv_freq, co, si);
        }
        let mut xb = vec![0.0f32; n * h];
        let (mut q, mut k, mut v) = (vec![0.0f32; n * qd], vec![0.0f32; n * kvd], vec![0.0f32; n * kvd]);
        let (mut att, mut o) = (vec![0.0f32; n * qd], vec![0.0f32; n * h]);
        for l in 0..c.layers {
            let made;
            let layer = match built {
                Some(layers) => layers.get(l).ok_or(Error::WrongState)?,
                None => {
                    made = self.layer::<false>(l)?;
                    &made
                }
            };
            // Attention: q, k, v for every token, then each token over the
            // cache up to its own position.
            for (xr, br) in x.chunks_exact(h).zip(xb.chunks_exact_mut(h)) {
                rms_norm(xr, layer.attn_norm, c.rms_eps, br)?;
            }
            layer.q.forward_batch(&xb, &mut q);
            layer.k.forward_batch(&xb, &mut k);
            layer.v.forward_batch(&xb, &mut v);
            for t in 0..n {
                let (co, si) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                let (qt, kt) = (&mut q[t * qd..(t + 1) * qd], &mut k[t * kvd..(t + 1) * kvd]);
                for head in qt.chunks_exact_mut(hd).chain(kt.chunks_exact_mut(hd)) {
                    rope(head, co, si);
                }
                kv.store(&c, l, pos + t, &k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd])?;
            }
            for (t, (qt, at)) in q.chunks_exact(qd).zip(att.chunks_exact_mut(qd)).enumerate() {
                self.heads(l, pos + t, kv, qt, w.scores, at)?;
            }
            layer.o.forward_batch(&att, &mut o);
            x.iter_mut().zip(&o).for_each(|(x, &d)| *x += d);
            // The MoE FFN.
            for (xr, br) in x.chunks_exact(h).zip(xb.chunks_exact_mut(h)) {
                rms_norm(xr, layer.ffn_norm, c.rms_eps, br)?;
            }
            self.ffn_batch((layer, l), &xb, &mut o, (w.router, w.y), |t, sel| on_layer(t, l, sel))?;
            x.iter_mut().zip(&o).for_each(|(x, &d)| *x += d);
        }
        let last = &x[(n - 1) * h..];
        rms_norm(last, self.final_norm, c.rms_eps, w.xb)?;
        self.head(w.xb, logits, w.xq);
        for _ in 0..n {
            state.advance();
        }
        crate::error::check_finite(What::Output, logits)
    }

    /// `out = moe(xb)` for every token of `xb` (`(tokens, hidden)`): the
    /// gate over the batch, each chosen expert once over its tokens, the
    /// shared expert over all, then [`moe::forward`] per token on them.
    fn ffn_batch(
        &self,
        (layer, l): (&Layer<'_>, usize),
        xb: &[f32],
        out: &mut [f32],
        (router_buf, y): (&mut [f32], &mut [f32]),
        mut on_token: impl FnMut(usize, &Selection<f32>),
    ) -> Result<()> {
        let (h, lc) = (self.cfg.hidden, layer.cfg);
        let n = xb.len() / h;
        let (experts, k) = (lc.experts, lc.k);
        let router = layer.gate.as_ref().map(|(_, r)| r);
        let mut logits = vec![0.0f32; n * experts];
        let mut sels = vec![Selection::new(); n];
        if let Some((gate, router)) = &layer.gate {
            gate.forward_batch(xb, &mut logits);
            for (s, lt) in sels.iter_mut().zip(logits.chunks_exact(experts)) {
                router.route(lt, s)?;
            }
        }
        // Each chosen expert once over its tokens, the experts over the threads.
        let plan = DispatchPlan::new(&sels, experts)?;
        let views = resolve(&plan, |e| self.expert::<false>(layer, l, e))?;
        let ys = run_groups(&plan, h, self.threads, 0.0f32, |e, group, ys| {
            let Some(Some(expert)) = views.get(e) else { return };
            let xs = gather(xb, h, group.iter().map(|&t| t as usize));
            let m = group.len();
            let (mut h1, mut h2) = (vec![0.0f32; m * lc.hidden], vec![0.0f32; m * lc.hidden]);
            expert.forward_with(&mut Batch(&xs), m, ys, (&mut h1, &mut h2), &mut ());
        });
        let entry = entries(&plan, n, k);
        let mut shared_y = Vec::new();
        let mut shared_logits = Vec::new();
        if let Some((shared, gate)) = &layer.shared {
            shared_y = vec![0.0f32; n * h];
            let (mut h1, mut h2) = (vec![0.0f32; n * lc.shared_hidden], vec![0.0f32; n * lc.shared_hidden]);
            shared.forward_with(&mut Batch(xb), n, &mut shared_y, (&mut h1, &mut h2), &mut ());
            if let Some(gate) = gate {
                shared_logits = vec![0.0f32; n];
                gate.forward_batch(xb, &mut shared_logits);
            }
        }
        let short = Error::ScratchTooSmall { needed: experts, actual: router_buf.len() };
        let lbuf = router_buf.get_mut(..experts).ok_or(short)?;
        for (t, out) in out.chunks_exact_mut(h).enumerate() {
            let done = Done {
                logits: &logits[t * experts..(t + 1) * experts],
                sel: &sels[t],
                entry: &entry[t * k..(t + 1) * k],
                ys: &ys,
                shared: layer
                    .shared
                    .as_ref()
                    .map(|_| (&shared_y[t * h..(t + 1) * h], shared_logits.get(t).copied())),
            };
            let sel = moe::forward(&done, router, &mut (), out, (&mut *lbuf, &mut *y), &mut ())?;
            on_token(t, &sel);
        }
        Ok(())
    }
}

impl<'a> Decoder<'a> {
    /// This decoder with a step's and a prefill's work spread over
    /// `threads` workers (at least 1): a step's chosen experts run side by
    /// side and the output projection's rows are split;
    /// a prefill's experts are spread. The same bits for any number
    /// (tests/prefill.rs); threads are started per layer, which pays from
    /// a few hundred thousand multiply-adds per expert.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The workers a step or a prefill uses ([`Decoder::with_threads`]).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// [`Decoder::ffn`] as a prefill of one token: the chosen experts
    /// spread over the threads, each from its own quantization of `xb`
    /// (the same bits), combined by [`moe::forward`] in router order.
    pub(super) fn ffn_threads(
        &self,
        layer: &Layer<'_>,
        l: usize,
        w: &mut Work<'_>,
    ) -> Result<Selection<f32>> {
        let mut sel = Selection::new();
        self.ffn_batch((layer, l), w.xb, w.acc, (w.router, w.y), |_, s| sel = s.clone())?;
        w.x.iter_mut().zip(w.acc.iter()).for_each(|(x, &d)| *x += d);
        Ok(sel)
    }
}

impl<const L: usize> ResolvedDecoder<'_, L> {
    /// [`Decoder::prefill`] on the built views: the same checks and bits.
    pub fn prefill(
        &self,
        state: &mut State<'_>,
        tokens: &[u32],
        logits: &mut [f32],
        on_layer: impl FnMut(usize, usize, &Selection<f32>),
    ) -> Result<()> {
        self.decoder.prefill_over(Some(&self.layers), state, tokens, logits, on_layer)
    }
}
