//! A decoder's memory: the KV cache (kept across tokens) and the work
//! buffers of one step, all carved from one caller-provided byte buffer.

use super::decoder::Config;
use crate::error::{Error, Result};
use crate::quant::f16;
use crate::scratch::{Carve, bytes_for};

/// Bytes a decoder's [`State`] needs, from its dimensions alone (`const`,
/// for buffers sized at compile time). `max_hidden` is the widest expert
/// or dense FFN, `max_experts` the most routed experts of any layer.
#[allow(clippy::too_many_arguments)]
pub const fn bytes_for_dims(
    (vocab, hidden, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
    context: usize,
    layers: usize,
    kv_f16: bool,
    max_hidden: usize,
    max_experts: usize,
) -> usize {
    let q_dim = heads.saturating_mul(head_dim);
    let kv_dim = kv_heads.saturating_mul(head_dim);
    let cache = layers.saturating_mul(2).saturating_mul(context).saturating_mul(kv_dim);
    let cache_bytes = if kv_f16 { bytes_for::<f16>(cache) } else { bytes_for::<f32>(cache) };
    let mut widest = if hidden > q_dim { hidden } else { q_dim };
    if max_hidden > widest {
        widest = max_hidden;
    }
    let floats = [
        hidden,
        hidden,
        hidden,
        hidden,
        q_dim,
        kv_dim,
        kv_dim,
        q_dim,
        context,
        max_hidden,
        max_hidden,
        max_experts,
        head_dim / 2,
        head_dim / 2,
        head_dim / 2,
    ];
    let mut total = cache_bytes
        .saturating_add(bytes_for::<i8>(widest))
        .saturating_add(bytes_for::<i8>(hidden))
        .saturating_add(bytes_for::<u32>(vocab));
    let mut i = 0;
    while i < floats.len() {
        total = total.saturating_add(bytes_for::<f32>(floats[i]));
        i += 1;
    }
    total
}

pub(crate) fn bytes(c: &Config, max_hidden: usize, max_experts: usize) -> usize {
    bytes_for_dims(
        (c.vocab, c.hidden, c.heads, c.kv_heads, c.head_dim),
        c.context,
        c.layers,
        c.kv_f16,
        max_hidden,
        max_experts,
    )
}

/// Elements of the KV cache, or [`Error::Overflow`].
fn cache_len(c: &Config) -> Result<usize> {
    let n = c.layers.checked_mul(2).and_then(|n| n.checked_mul(c.context));
    n.and_then(|n| n.checked_mul(c.kv_dim())).ok_or(Error::Overflow)
}

/// The KV cache: per layer, keys then values, `(context, kv_heads * head_dim)` each.
#[derive(Debug)]
pub(crate) enum Kv<'s> {
    F32(&'s mut [f32]),
    F16(&'s mut [f16]),
}

impl Kv<'_> {
    fn at(c: &Config, l: usize, which: usize, t: usize) -> usize {
        ((l * 2 + which) * c.context + t) * c.kv_dim()
    }

    /// Stores position `pos`'s keys and values of layer `l`. The cache was
    /// sized for `c` ([`State::split`] checks), so a position outside it is
    /// [`Error::WrongState`], never a panic or a skipped store.
    pub(crate) fn store(&mut self, c: &Config, l: usize, pos: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let n = c.kv_dim();
        for (at, src) in [(Self::at(c, l, 0, pos), k), (Self::at(c, l, 1, pos), v)] {
            let end = at.checked_add(n).ok_or(Error::WrongState)?;
            match self {
                Kv::F32(m) => {
                    let dst = m.get_mut(at..end).ok_or(Error::WrongState)?;
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s);
                }
                Kv::F16(m) => {
                    let dst = m.get_mut(at..end).ok_or(Error::WrongState)?;
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f16::from_f32(s));
                }
            }
        }
        Ok(())
    }

    /// Layer `l`'s keys and values at positions `0..n`, `(n, kv_dim)` each,
    /// checked once here so the attention loops index nothing unchecked.
    pub(crate) fn layer(&self, c: &Config, l: usize, n: usize) -> Result<Slabs<'_>> {
        let len = n.checked_mul(c.kv_dim()).ok_or(Error::WrongState)?;
        let (k, v) = (Self::at(c, l, 0, 0), Self::at(c, l, 1, 0));
        let range = |at: usize| at..at.saturating_add(len);
        match self {
            Kv::F32(m) => match (m.get(range(k)), m.get(range(v))) {
                (Some(k), Some(v)) => Ok(Slabs::F32(k, v)),
                _ => Err(Error::WrongState),
            },
            Kv::F16(m) => match (m.get(range(k)), m.get(range(v))) {
                (Some(k), Some(v)) => Ok(Slabs::F16(k, v)),
                _ => Err(Error::WrongState),
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            Kv::F32(m) => m.len(),
            Kv::F16(m) => m.len(),
        }
    }
}

/// One layer's cached keys and values (see [`Kv::layer`]).
pub(crate) enum Slabs<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

/// One step's buffers.
pub(crate) struct Work<'w> {
    /// The residual stream `(hidden,)`.
    pub x: &'w mut [f32],
    /// Normalized input / attention output `(hidden,)`.
    pub xb: &'w mut [f32],
    /// FFN sum `(hidden,)`.
    pub acc: &'w mut [f32],
    /// One expert's output `(hidden,)`.
    pub y: &'w mut [f32],
    pub q: &'w mut [f32],
    pub k: &'w mut [f32],
    pub v: &'w mut [f32],
    /// Attention output `(heads * head_dim,)`.
    pub att: &'w mut [f32],
    /// Attention scores `(context,)`.
    pub scores: &'w mut [f32],
    /// SwiGLU gate and up `(max_hidden,)`.
    pub g: &'w mut [f32],
    pub u: &'w mut [f32],
    /// Router logits `(max_experts,)`.
    pub router: &'w mut [f32],
    pub cos: &'w mut [f32],
    pub sin: &'w mut [f32],
    /// RoPE inverse frequencies `(head_dim / 2,)`, filled when the state was made.
    pub inv_freq: &'w [f32],
    /// A quantized input vector (int8 matrices).
    pub xq: &'w mut [i8],
    /// `xb` quantized (`(hidden,)`), shared by the products that read it.
    pub xbq: &'w mut [i8],
    /// Token order for sampling `(vocab,)`.
    pub order: &'w mut [u32],
}

/// Where a decoder is in a sequence: the KV cache up to the current
/// position, and work space. Made by [`Decoder::state`](super::Decoder::state).
#[derive(Debug)]
pub struct State<'s> {
    kv: Kv<'s>,
    /// RoPE inverse frequencies (they depend on the configuration only).
    inv_freq: &'s mut [f32],
    work: &'s mut [u8],
    pos: usize,
    /// The configuration the state was made for.
    cfg: Config,
    /// Widest FFN and most experts of any layer.
    ffn: (usize, usize),
}

impl<'s> State<'s> {
    pub(crate) fn new(c: &Config, ffn: (usize, usize), buf: &'s mut [u8]) -> Result<Self> {
        let mut carve = Carve::new(buf);
        let n = cache_len(c)?;
        let kv = if c.kv_f16 { Kv::F16(carve.take::<f16>(n)?) } else { Kv::F32(carve.take::<f32>(n)?) };
        let inv_freq = carve.take::<f32>(c.head_dim / 2)?;
        super::decoder::rope_inv_freq(c, inv_freq);
        Ok(State { kv, inv_freq, work: carve.rest(), pos: 0, cfg: *c, ffn })
    }

    /// Tokens fed so far (the next token's position).
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Forgets the sequence: the next token is at position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// The next token from `logits` by `sampler`, using the state's work
    /// space for the ordering top-p needs.
    pub fn sample(&mut self, sampler: &mut super::Sampler, logits: &mut [f32]) -> Result<u32> {
        let (cfg, ffn) = (self.cfg, self.ffn);
        let (_, w) = self.split(&cfg, ffn)?;
        sampler.sample(logits, w.order)
    }

    pub(crate) fn advance(&mut self) {
        self.pos += 1;
    }

    /// The cache and this step's buffers; an error if the state was made
    /// for another decoder.
    pub(crate) fn split(&mut self, c: &Config, ffn: (usize, usize)) -> Result<(&mut Kv<'s>, Work<'_>)> {
        if *c != self.cfg || ffn != self.ffn || Some(self.kv.len()) != cache_len(c).ok() {
            return Err(Error::WrongState);
        }
        let mut w = Carve::new(&mut *self.work);
        let (h, q, kvd, hd) = (c.hidden, c.q_dim(), c.kv_dim(), c.head_dim);
        let x = w.take(h)?;
        let xb = w.take(h)?;
        let acc = w.take(h)?;
        let y = w.take(h)?;
        let q_buf = w.take(q)?;
        let k = w.take(kvd)?;
        let v = w.take(kvd)?;
        let att = w.take(q)?;
        let scores = w.take(c.context)?;
        let (max_hidden, max_experts) = self.ffn;
        let g = w.take(max_hidden)?;
        let u = w.take(max_hidden)?;
        let router = w.take(max_experts)?;
        let cos = w.take(hd / 2)?;
        let sin = w.take(hd / 2)?;
        let xq = w.take(h.max(q).max(max_hidden))?;
        let xbq = w.take(h)?;
        let order = w.take(c.vocab)?;
        Ok((
            &mut self.kv,
            Work {
                x,
                xb,
                acc,
                y,
                q: q_buf,
                k,
                v,
                att,
                scores,
                g,
                u,
                router,
                cos,
                sin,
                inv_freq: self.inv_freq,
                xq,
                xbq,
                order,
            },
        ))
    }
}
