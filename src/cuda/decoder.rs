//! Whole decoders on the device: [`CudaDecoder`].
//!
//! Every layer of a parsed [`Decoder`] (f32 or f16 matrices) is uploaded
//! once; each sequence has its own KV cache on the device (a slot of one
//! pool). A batch is any set of sequences, each with one or more new tokens:
//! a prompt is one sequence with many (prefill: every matrix multiplies all
//! of its tokens in one launch, the experts run as grouped GEMMs over the
//! tokens routed to them), decoding is many sequences with one token each.
//! Per layer: RMSNorm, q/k/v, RoPE, the cache, causal attention, o, the
//! residual, RMSNorm, the MoE FFN ([`DeviceFfn::run`]: the gate on the
//! device, the routing on the host by the crate's [`Router`], the CPU's
//! code), the residual; then the final norm and the output projection of
//! each sequence's last token.
//!
//! Every value is computed by one thread in an order that depends only on
//! the shapes, so a sequence gives the same bits alone or in any batch, and
//! a prompt gives the same bits as a prefill or token by token. The norms,
//! projections, RoPE, cache and attention follow the CPU decoder's float
//! order exactly (RoPE's angles are made on the host by the CPU's code);
//! the expert GEMMs (fused multiply-adds in input order) and `expf` (SiLU,
//! softmax) are where the device's logits part from the CPU's by rounding.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::{Arg, Buf, Device, Host, Kernel, Shape};
use super::{CudaError, DeviceFfn, FfnParts, HostExperts, Mat, Precision, Target, int, upload};
use crate::error::{Error, What, check_len};
use crate::expert::Ffn;
use crate::kernels::Activation;
use crate::model::{Config, Decoder, Matrix, Weights};
use crate::router::Selection;

/// A matrix on the device, with its bias (q, k, v of Qwen2-MoE).
struct DeviceMatrix {
    w: Buf,
    bias: Option<Buf>,
    rows: usize,
    cols: usize,
}

struct DeviceLayer {
    attn_norm: Buf,
    ffn_norm: Buf,
    q: DeviceMatrix,
    k: DeviceMatrix,
    v: DeviceMatrix,
    o: DeviceMatrix,
    ffn: DeviceFfn,
}

/// A decoder resident on a GPU (or in the [`Emulator`](super::Emulator)),
/// with a KV cache for up to `sequences` sequences at once.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use micromoe::cuda::CudaDecoder;
/// let bytes = micromoe::format::write::AlignedBytes::from(&std::fs::read("model.moe")?[..]);
/// let decoder = micromoe::model::Decoder::parse(&bytes)?;
/// let gpu = CudaDecoder::new(&decoder, 16)?; // caches for 16 sequences
/// let vocab = decoder.config().vocab;
/// // Two prompts, each prefilled as one batch, then decoded side by side.
/// let (mut a, mut b) = (gpu.sequence()?, gpu.sequence()?);
/// let mut logits = vec![0.0; 2 * vocab];
/// gpu.prefill(&mut a, &[1, 2, 3], &mut logits[..vocab], |_, _, _| {})?;
/// gpu.prefill(&mut b, &[4, 5], &mut logits[vocab..], |_, _, _| {})?;
/// let mut seqs = [a, b];
/// gpu.step_batch(&mut seqs, &[7, 8], &mut logits)?;
/// # Ok(()) }
/// ```
pub struct CudaDecoder {
    device: Box<dyn Device>,
    cfg: Config,
    precision: Precision,
    embed: DeviceMatrix,
    /// `None`: tied to the embedding.
    lm_head: Option<DeviceMatrix>,
    final_norm: Buf,
    layers: Vec<DeviceLayer>,
    inv_freq: Vec<f32>,
    /// Per slot: `layers` planes of keys, then `layers` of values, each
    /// `(context, kv_dim)` (f32; f16-rounded values for an f16 cache).
    cache: Buf,
    slots: Arc<Mutex<Vec<bool>>>,
    id: u64,
}

/// One sequence's place in a [`CudaDecoder`]'s KV cache and its position.
/// Its cache slot is free again when it is dropped.
pub struct Sequence {
    slot: usize,
    pos: usize,
    decoder: u64,
    slots: Arc<Mutex<Vec<bool>>>,
}

impl Sequence {
    /// Tokens fed so far (the next token's position).
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Back to position 0 (the cache is overwritten as tokens come).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock()
            && let Some(used) = s.get_mut(self.slot)
        {
            *used = false;
        }
    }
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence").field("slot", &self.slot).field("pos", &self.pos).finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const INT8: CudaError = CudaError::Unsupported("int8 decoders (convert with --dtype f32 or f16)");

/// A matrix's values as f32 (f16 widened exactly).
fn values(m: &Matrix<'_>) -> Result<Vec<f32>, CudaError> {
    match m.weights() {
        Weights::F32(w) => Ok(w.to_vec()),
        Weights::F16(w) => Ok(w.iter().map(|v| v.to_f32()).collect()),
        Weights::I8 { .. } => Err(INT8),
    }
}

/// Whether `m` is stored as f16 (an int8 matrix is refused).
fn is_f16(m: &Matrix<'_>) -> Result<bool, CudaError> {
    match m.weights() {
        Weights::F32(_) => Ok(false),
        Weights::F16(_) => Ok(true),
        Weights::I8 { .. } => Err(INT8),
    }
}

/// A decoder expert's three matrices, checked to be the SwiGLU the kernels run.
fn swiglu_parts<'m, 'a>(e: &'m Ffn<Matrix<'a>>) -> Result<[&'m Matrix<'a>; 3], CudaError> {
    match e {
        Ffn::Gated { gate, up, act: Activation::Silu, down } => Ok([gate, up, down]),
        _ => Err(CudaError::Unsupported("experts other than gated SiLU (SwiGLU)")),
    }
}

/// A decoder matrix for [`HostExperts::push`].
fn mat(m: &Matrix<'_>) -> Result<Mat, CudaError> {
    Ok(Mat { rows: m.rows(), cols: m.cols(), values: values(m)?, bias: m.bias().map(<[f32]>::to_vec) })
}

impl CudaDecoder {
    /// Uploads `decoder` to GPU 0 with KV caches for `sequences` sequences
    /// at once, and compiles the kernels. f16 matrices stay f16 on the
    /// device when every matrix is f16 (else all are f32, f16 ones widened
    /// exactly); router gates are f32 (widened). int8 decoders are
    /// [`CudaError::Unsupported`].
    pub fn new(decoder: &Decoder<'_>, sequences: usize) -> Result<Self, CudaError> {
        Self::on(Target::Gpu, decoder, sequences)
    }

    /// Like [`new`](Self::new), on `target`.
    pub fn on(target: Target<'_>, decoder: &Decoder<'_>, sequences: usize) -> Result<Self, CudaError> {
        let precision = Self::precision_of(decoder)?;
        match target {
            Target::Gpu => {
                super::available()?;
                let device = Box::new(super::device::Cuda::new(precision)?);
                Self::upload(device, decoder, precision, sequences)
            }
            Target::Emulator(emu) => {
                Self::upload(Box::new(emu.start(precision)?), decoder, precision, sequences)
            }
        }
    }

    /// F16 when every matrix but the gates is f16.
    fn precision_of(decoder: &Decoder<'_>) -> Result<Precision, CudaError> {
        let c = decoder.config();
        let mut all_f16 = is_f16(&decoder.embed)? & is_f16(&decoder.lm_head)?;
        for l in 0..c.layers {
            let layer = decoder.layer::<false>(l)?;
            for m in [&layer.q, &layer.k, &layer.v, &layer.o] {
                all_f16 &= is_f16(m)?;
            }
            if let Some((g, _)) = &layer.gate {
                is_f16(g)?;
            }
            if let Some((s, g)) = &layer.shared {
                for m in swiglu_parts(s)? {
                    all_f16 &= is_f16(m)?;
                }
                if let Some(g) = g {
                    is_f16(g)?;
                }
            }
            for e in 0..layer.cfg.experts {
                for m in swiglu_parts(&decoder.expert::<false>(&layer, l, e)?)? {
                    all_f16 &= is_f16(m)?;
                }
            }
        }
        Ok(if all_f16 { Precision::F16 } else { Precision::F32 })
    }

    fn upload(
        device: Box<dyn Device>,
        decoder: &Decoder<'_>,
        precision: Precision,
        sequences: usize,
    ) -> Result<Self, CudaError> {
        let c = *decoder.config();
        let dev = &*device;
        let matrix = |m: &Matrix<'_>| -> Result<DeviceMatrix, CudaError> {
            int(m.rows() * m.cols())?;
            let bias = match m.bias() {
                Some(b) => Some(dev.upload(Host::F32(b))?),
                None => None,
            };
            Ok(DeviceMatrix { w: upload(dev, &values(m)?, precision)?, bias, rows: m.rows(), cols: m.cols() })
        };
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let layer = decoder.layer::<false>(l)?;
            let mut gate = Vec::new();
            let routed = match &layer.gate {
                Some((g, router)) => {
                    gate = values(g)?;
                    let mut e = HostExperts::default();
                    for i in 0..layer.cfg.experts {
                        e.push(&decoder.expert::<false>(&layer, l, i)?, c.hidden, mat)?;
                    }
                    Some((e, *router.rule(), router.bias().map(<[f32]>::to_vec), router.scaling()))
                }
                None => None,
            };
            let shared = match &layer.shared {
                Some((s, g)) => {
                    let mut e = HostExperts::default();
                    e.push(s, c.hidden, mat)?;
                    if let Some(g) = g {
                        gate.extend(values(g)?);
                    }
                    Some((e, g.is_some()))
                }
                None => None,
            };
            let ffn = FfnParts { gate, routed, shared, d: c.hidden }.upload(dev, precision)?;
            layers.push(DeviceLayer {
                attn_norm: dev.upload(Host::F32(layer.attn_norm))?,
                ffn_norm: dev.upload(Host::F32(layer.ffn_norm))?,
                q: matrix(&layer.q)?,
                k: matrix(&layer.k)?,
                v: matrix(&layer.v)?,
                o: matrix(&layer.o)?,
                ffn,
            });
        }
        let sequences = sequences.max(1);
        let cache_len = sequences
            .checked_mul(2 * c.layers)
            .and_then(|n| n.checked_mul(c.context))
            .and_then(|n| n.checked_mul(c.kv_dim()))
            .ok_or(CudaError::Unsupported("a KV cache this large"))?;
        let mut inv_freq = vec![0.0f32; c.head_dim / 2];
        crate::model::rope_inv_freq(&c, &mut inv_freq);
        Ok(CudaDecoder {
            embed: matrix(&decoder.embed)?,
            lm_head: if c.tied { None } else { Some(matrix(&decoder.lm_head)?) },
            final_norm: dev.upload(Host::F32(decoder.final_norm))?,
            cache: dev.zeros(cache_len)?,
            device,
            cfg: c,
            precision,
            layers,
            inv_freq,
            slots: Arc::new(Mutex::new(vec![false; sequences])),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The decoder record.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The matrices' type on the device.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// A new sequence at position 0 in a free cache slot;
    /// [`CudaError::Sequence`] when every slot is taken.
    pub fn sequence(&self) -> Result<Sequence, CudaError> {
        let mut s = self.slots.lock().map_err(|_| CudaError::Sequence("the slot table is poisoned"))?;
        let slot = s
            .iter()
            .position(|&used| !used)
            .ok_or(CudaError::Sequence("every KV-cache slot is in use (CudaDecoder::new's `sequences`)"))?;
        s[slot] = true;
        Ok(Sequence { slot, pos: 0, decoder: self.id, slots: self.slots.clone() })
    }

    /// Feeds `tokens` (at least one) to `seq` as one batch per layer and
    /// writes the logits after the last one to `logits` (`vocab` wide):
    /// the same bits as [`step`](Self::step) over each token in turn.
    /// `on_layer(token, layer, selection)` sees each token's experts.
    pub fn prefill(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        logits: &mut [f32],
        on_layer: impl FnMut(usize, usize, &Selection<f32>),
    ) -> Result<(), CudaError> {
        self.forward(&mut [(seq, tokens)], logits, on_layer)
    }

    /// Feeds one token to `seq`; `on_layer(layer, selection)`.
    pub fn step(
        &self,
        seq: &mut Sequence,
        token: u32,
        logits: &mut [f32],
        mut on_layer: impl FnMut(usize, &Selection<f32>),
    ) -> Result<(), CudaError> {
        self.forward(&mut [(seq, &[token])], logits, |_, l, s| on_layer(l, s))
    }

    /// One token for each of `seqs` (`tokens[i]` to `seqs[i]`) in one
    /// batch: `logits` is `(seqs.len(), vocab)`. Each sequence's logits are
    /// the bits it gets alone.
    pub fn step_batch(
        &self,
        seqs: &mut [Sequence],
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<(), CudaError> {
        if tokens.len() != seqs.len() {
            return Err(Error::Shape { what: What::Token, expected: seqs.len(), actual: tokens.len() }.into());
        }
        let mut batch: Vec<(&mut Sequence, &[u32])> =
            seqs.iter_mut().zip(tokens).map(|(s, t)| (s, core::slice::from_ref(t))).collect();
        self.forward(&mut batch, logits, |_, _, _| {})
    }

    /// The general batch: each entry's tokens fed to its sequence, every
    /// entry's tokens through each layer together. `logits` is
    /// `(batch.len(), vocab)`: after each entry's last token.
    /// `on_layer(row, layer, selection)` sees every token's experts, `row`
    /// counting the batch's tokens in order. Nothing changes (positions,
    /// caches) when the batch is refused: an empty entry, a token outside
    /// the vocabulary, a context overrun ([`Error::ContextFull`]), a
    /// sequence of another decoder or twice in the batch.
    pub fn forward(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        logits: &mut [f32],
        mut on_layer: impl FnMut(usize, usize, &Selection<f32>),
    ) -> Result<(), CudaError> {
        let c = &self.cfg;
        let (h, qd, kvd, hd) = (c.hidden, c.q_dim(), c.kv_dim(), c.head_dim);
        check_len(What::Output, batch.len() * c.vocab, logits.len())?;
        if batch.is_empty() {
            return Err(Error::Shape { what: What::Token, expected: 1, actual: 0 }.into());
        }
        let mut seen = Vec::with_capacity(batch.len());
        for (seq, tokens) in batch.iter() {
            if seq.decoder != self.id {
                return Err(CudaError::Sequence("a sequence of another CudaDecoder"));
            }
            if seen.contains(&seq.slot) {
                return Err(CudaError::Sequence("a sequence twice in one batch"));
            }
            seen.push(seq.slot);
            if tokens.is_empty() {
                return Err(Error::Shape { what: What::Token, expected: 1, actual: 0 }.into());
            }
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(Error::OutOfRange { what: What::Token, index: t as usize }.into());
            }
            if seq.pos.saturating_add(tokens.len()) > c.context {
                return Err(Error::ContextFull { context: c.context }.into());
            }
        }
        // The batch's rows: token, cache slot, position, RoPE angles.
        let (mut tok, mut slot, mut pos, mut last) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let half = hd / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for (seq, tokens) in batch.iter() {
            for (i, &t) in tokens.iter().enumerate() {
                tok.push(t as i32);
                slot.push(int(seq.slot)?);
                pos.push(int(seq.pos + i)?);
                let at = cos.len();
                cos.resize(at + half, 0.0);
                sin.resize(at + half, 0.0);
                crate::model::rope_table(seq.pos + i, &self.inv_freq, &mut cos[at..], &mut sin[at..]);
            }
            last.push(int(tok.len() - 1)?);
        }
        let rows = tok.len();
        int(rows * c.heads * c.context)?;
        int(rows * qd.max(h).max(c.vocab))?;
        let dev = &*self.device;
        let ints = |v: &[i32]| dev.upload(Host::I32(v));
        let (tok_d, slot_d, pos_d) = (ints(&tok)?, ints(&slot)?, ints(&pos)?);
        let (cos_d, sin_d) = (dev.upload(Host::F32(&cos))?, dev.upload(Host::F32(&sin))?);
        let i = |v: usize| Arg::Int(v as i32);
        let (eps, scale) = (c.rms_eps.to_bits() as i32, (1.0 / libm::sqrtf(hd as f32)).to_bits() as i32);
        let group = c.heads / c.kv_heads;
        let (layers, ctx) = (c.layers, c.context);

        let x = dev.zeros(rows * h)?;
        let args = [Arg::Buf(&self.embed.w), Arg::Buf(&tok_d), Arg::Buf(&x), i(rows), i(h)];
        dev.launch(Kernel::Embed, Shape::elements(rows * h)?, &args)?;
        let xb = dev.zeros(rows * h)?;
        let (q, k, v) = (dev.zeros(rows * qd)?, dev.zeros(rows * kvd)?, dev.zeros(rows * kvd)?);
        let (att, o) = (dev.zeros(rows * qd)?, dev.zeros(rows * h)?);
        let scores = dev.zeros(rows * c.heads * ctx)?;
        let norm = dev.zeros(rows)?;
        for (l, layer) in self.layers.iter().enumerate() {
            self.rms_norm(&x, &layer.attn_norm, (&xb, &norm), rows, eps)?;
            self.linear(&layer.q, &xb, &q, rows)?;
            self.linear(&layer.k, &xb, &k, rows)?;
            self.linear(&layer.v, &xb, &v, rows)?;
            for (buf, width) in [(&q, qd), (&k, kvd)] {
                let args = [Arg::Buf(buf), Arg::Buf(&cos_d), Arg::Buf(&sin_d), i(rows), i(width), i(hd)];
                dev.launch(Kernel::Rope, Shape::elements(rows * width / 2)?, &args)?;
            }
            let (sl, po) = (Arg::Buf(&slot_d), Arg::Buf(&pos_d));
            let args = [Arg::Buf(&k), Arg::Buf(&v), Arg::Buf(&self.cache), sl, po, i(rows), i(l), i(layers)];
            let args = [&args[..], &[i(ctx), i(kvd), i(c.kv_f16 as usize)]].concat();
            dev.launch(Kernel::KvStore, Shape::elements(rows * kvd)?, &args)?;
            let dims = [i(rows), i(c.heads), i(group), i(hd), i(l), i(layers), i(ctx), i(kvd)];
            let args =
                [&[Arg::Buf(&q), Arg::Buf(&self.cache), Arg::Buf(&scores), sl, po], &dims[..]].concat();
            let args = [&args[..], &[Arg::Int(scale)]].concat();
            dev.launch(Kernel::AttnScores, Shape::elements(rows * c.heads * ctx)?, &args)?;
            let args = [Arg::Buf(&scores), po, i(rows), i(c.heads), i(ctx)];
            dev.launch(Kernel::AttnSoftmax, Shape::elements(rows * c.heads)?, &args)?;
            let args =
                [&[Arg::Buf(&scores), Arg::Buf(&self.cache), Arg::Buf(&att), sl, po], &dims[..]].concat();
            dev.launch(Kernel::AttnOut, Shape::elements(rows * qd)?, &args)?;
            self.linear(&layer.o, &att, &o, rows)?;
            self.add(&x, &o, rows * h)?;
            self.rms_norm(&x, &layer.ffn_norm, (&xb, &norm), rows, eps)?;
            let (y, sels) = layer.ffn.run(dev, &xb, rows)?;
            self.add(&x, &y, rows * h)?;
            for (r, s) in sels.iter().enumerate() {
                on_layer(r, l, s);
            }
        }
        // Each entry's last token: the final norm and the output projection.
        let n = batch.len();
        let (last_d, xl, xn) = (ints(&last)?, dev.zeros(n * h)?, dev.zeros(n * h)?);
        let args = [Arg::Buf(&x), Arg::Buf(&last_d), Arg::Buf(&xl), i(n), i(h)];
        dev.launch(Kernel::GatherRows, Shape::elements(n * h)?, &args)?;
        self.rms_norm(&xl, &self.final_norm, (&xn, &norm), n, eps)?;
        let out = dev.zeros(n * c.vocab)?;
        self.linear(self.lm_head.as_ref().unwrap_or(&self.embed), &xn, &out, n)?;
        dev.download(&out, logits)?;
        // A hidden state or weight that overflowed shows here, as NaN or infinity.
        crate::error::check_finite(What::Output, logits)?;
        for (seq, tokens) in batch.iter_mut() {
            seq.pos += tokens.len();
        }
        Ok(())
    }

    /// `out = rms_norm(x) * g` for `rows` rows; `scale` holds a value a row.
    fn rms_norm(
        &self,
        x: &Buf,
        g: &Buf,
        (out, scale): (&Buf, &Buf),
        rows: usize,
        eps: i32,
    ) -> Result<(), CudaError> {
        let (dev, h) = (&*self.device, self.cfg.hidden as i32);
        let args = [Arg::Buf(x), Arg::Buf(scale), Arg::Int(rows as i32), Arg::Int(h), Arg::Int(eps)];
        dev.launch(Kernel::RmsScale, Shape::elements(rows)?, &args)?;
        let args =
            [Arg::Buf(x), Arg::Buf(scale), Arg::Buf(g), Arg::Buf(out), Arg::Int(rows as i32), Arg::Int(h)];
        dev.launch(Kernel::RmsApply, Shape::elements(rows * self.cfg.hidden)?, &args)
    }

    /// `out = m x` for `rows` rows of `x`.
    fn linear(&self, m: &DeviceMatrix, x: &Buf, out: &Buf, rows: usize) -> Result<(), CudaError> {
        int(rows * m.rows)?;
        // Without a bias the kernel reads none; `x` stands in for the pointer.
        let bias = m.bias.as_ref().unwrap_or(x);
        let args = [Arg::Buf(&m.w), Arg::Buf(bias), Arg::Buf(x), Arg::Buf(out)];
        let dims = [rows, m.rows, m.cols, m.bias.is_some() as usize].map(|v| Arg::Int(v as i32));
        self.device.launch(Kernel::Linear, Shape::elements(rows * m.rows)?, &[&args[..], &dims[..]].concat())
    }

    fn add(&self, x: &Buf, d: &Buf, n: usize) -> Result<(), CudaError> {
        let args = [Arg::Buf(x), Arg::Buf(d), Arg::Int(n as i32)];
        self.device.launch(Kernel::Add, Shape::elements(n)?, &args)
    }
}
