//! A Mixtral / Qwen2-MoE style decoder over a parsed `.moe` (architecture 3).
//!
//! One token at a time, read top to bottom as llama2.c does:
//! embed -> per layer [RMSNorm -> q,k,v -> RoPE -> cache -> attention -> o
//! -> residual -> RMSNorm -> MoE FFN -> residual] -> RMSNorm -> output.

#[cfg(feature = "std")]
mod host;

use super::matrix::{Input, Matrix, Weights};
use super::state::{Kv, Slabs, State, Work};
use crate::error::{Error, Field, Result, What, check_len};
use crate::expert::Ffn;
use crate::format::layout::decoder::{self as dl, MODEL_LEVEL, SCALE_PART, role as drole};
use crate::format::layout::{self, LAYER_LEN, LAYER_LEVEL, SHARED_EXPERT, dtype, part, role};
use crate::format::{Header, Key, Table, check_entries};
use crate::kernels::{Activation, FloatWeight};
use crate::moe;
use crate::quant::f16;
use crate::router::{MAX_K, Router, Rule, Selection};

/// Largest width (hidden, heads x head_dim, expert hidden, vocabulary) a
/// decoder may have; keeps int8 sums inside `i32`.
pub const MAX_WIDTH: usize = super::matrix::MAX_INT8_COLS;
/// Most experts per decoder layer.
pub const MAX_EXPERTS: usize = 256;

/// The decoder record, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// Vocabulary size.
    pub vocab: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Width of one head (even).
    pub head_dim: usize,
    /// Positions the KV cache holds.
    pub context: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Output projection = token embedding.
    pub tied: bool,
    /// q, k, v have biases.
    pub qkv_bias: bool,
    /// The KV cache holds f16.
    pub kv_f16: bool,
    /// Decoder layers.
    pub layers: usize,
}

/// One decoder layer record, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LayerConfig {
    /// Routed experts (0: a dense layer).
    pub experts: usize,
    /// Experts chosen per token.
    pub k: usize,
    /// Hidden width of a routed expert.
    pub hidden: usize,
    /// Hidden width of the shared expert (0: none).
    pub shared_hidden: usize,
    /// Renormalize the chosen weights.
    pub normalize: bool,
    /// The shared expert has a sigmoid gate.
    pub shared_gate: bool,
}

fn word(bytes: &[u8], at: usize, field: Field, layer: usize) -> Result<u32> {
    layout::u32_at(bytes, at).ok_or(Error::BadField { field, layer })
}

impl Config {
    /// Reads and checks the decoder record of `bytes` (`n_layers` from the header).
    pub(crate) fn read(bytes: &[u8], n_layers: usize) -> Result<Config> {
        let base = layout::HEADER_LEN;
        let w = |i: usize| word(bytes, base + 4 * i, Field::Dims, 0);
        let bad = |field| Error::BadField { field, layer: 0 };
        let dim = |i| -> Result<usize> {
            let v = w(i)? as usize;
            if (1..=MAX_WIDTH).contains(&v) { Ok(v) } else { Err(bad(Field::Dims)) }
        };
        let flags = w(dl::FLAGS)?;
        if flags & !dl::flags::ALL != 0 {
            return Err(bad(Field::Routing));
        }
        if (dl::RESERVED..dl::WORDS).any(|i| w(i).ok() != Some(0)) {
            return Err(bad(Field::Reserved));
        }
        let c = Config {
            vocab: dim(dl::VOCAB)?,
            hidden: dim(dl::HIDDEN)?,
            heads: dim(dl::HEADS)?,
            kv_heads: dim(dl::KV_HEADS)?,
            head_dim: dim(dl::HEAD_DIM)?,
            context: dim(dl::CONTEXT)?,
            rope_theta: f32::from_bits(w(dl::ROPE_THETA)?),
            rms_eps: f32::from_bits(w(dl::RMS_EPS)?),
            tied: flags & dl::flags::TIED != 0,
            qkv_bias: flags & dl::flags::QKV_BIAS != 0,
            kv_f16: flags & dl::flags::KV_F16 != 0,
            layers: n_layers,
        };
        let heads_ok = c.heads.is_multiple_of(c.kv_heads)
            && c.head_dim.is_multiple_of(2)
            && c.heads.checked_mul(c.head_dim).is_some_and(|d| d <= MAX_WIDTH);
        if !heads_ok {
            return Err(bad(Field::Dims));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 1.0 && c.rms_eps.is_finite() && c.rms_eps >= 0.0) {
            return Err(bad(Field::Quant));
        }
        Ok(c)
    }

    /// Width of the attention output (`heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of one position's keys (or values) in the cache.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

impl LayerConfig {
    /// Reads and checks decoder layer record `l`.
    pub(crate) fn read(bytes: &[u8], l: usize) -> Result<LayerConfig> {
        let base = layout::HEADER_LEN + dl::LEN + l * LAYER_LEN;
        let w = |i: usize| word(bytes, base + 4 * i, Field::Dims, l);
        let bad = |field| Error::BadField { field, layer: l };
        let flags = w(dl::layer::FLAGS)?;
        if flags & !dl::layer::flags::ALL != 0 {
            return Err(bad(Field::Routing));
        }
        if (dl::layer::RESERVED..layout::layer::WORDS).any(|i| w(i).ok() != Some(0)) {
            return Err(bad(Field::Reserved));
        }
        let (experts, k) = (w(dl::layer::EXPERTS)? as usize, w(dl::layer::K)? as usize);
        let (hidden, shared_hidden) = (w(dl::layer::HIDDEN)? as usize, w(dl::layer::SHARED_HIDDEN)? as usize);
        let c = LayerConfig {
            experts,
            k,
            hidden,
            shared_hidden,
            normalize: flags & dl::layer::flags::NORMALIZE != 0,
            shared_gate: flags & dl::layer::flags::SHARED_GATE != 0,
        };
        let routed_ok = if experts == 0 {
            k == 0 && hidden == 0 && !c.normalize
        } else {
            experts <= MAX_EXPERTS
                && (1..=MAX_K.min(experts)).contains(&k)
                && (1..=MAX_WIDTH).contains(&hidden)
        };
        let shared_ok =
            if shared_hidden == 0 { !c.shared_gate && experts > 0 } else { shared_hidden <= MAX_WIDTH };
        if !(routed_ok && shared_ok) {
            return Err(bad(Field::Routing));
        }
        Ok(c)
    }

    fn rule(&self) -> Rule {
        if self.normalize {
            Rule::mixtral(self.experts, self.k)
        } else {
            Rule::qwen2_moe(self.experts, self.k, false)
        }
    }
}

/// Whether a tensor key may appear in a decoder with `cfg` (codes and
/// indices only; shapes are checked when layers are built).
fn key_allowed(bytes: &[u8], cfg: &Config, key: Key) -> Result<bool> {
    let part_ok = key.part == part::WEIGHT || key.part == part::BIAS || key.part == SCALE_PART;
    if !part_ok || key.role >= drole::COUNT {
        return Ok(false);
    }
    if key.layer == MODEL_LEVEL {
        return Ok(key.expert == LAYER_LEVEL
            && matches!(key.role, drole::EMBED | drole::FINAL_NORM | drole::LM_HEAD));
    }
    if key.layer as usize >= cfg.layers {
        return Ok(false);
    }
    let lc = LayerConfig::read(bytes, key.layer as usize)?;
    let expert_role = matches!(key.role, role::UP | role::GATE_PROJ | role::DOWN);
    Ok(match key.expert {
        LAYER_LEVEL => !expert_role && key.role != drole::EMBED && key.role < drole::FINAL_NORM,
        SHARED_EXPERT => expert_role && lc.shared_hidden > 0,
        e => expert_role && (e as usize) < lc.experts,
    })
}

/// A decoder expert: a gated SwiGLU FFN, `down(silu(gate_proj x) * up x)`,
/// the same [`Ffn`] (and the same float forward) as the stack's experts.
pub(crate) type SwiGlu<'a> = Ffn<Matrix<'a>>;

/// The work space of one decoder expert: its gate and up halves `(inner,)`
/// and the hidden vector quantized for an int8 `down`.
struct FfnWork<'w> {
    g: &'w mut [f32],
    u: &'w mut [f32],
    xq: &'w mut [i8],
}

/// A decoder layer's FFN as the one float MoE ([`moe::forward`]) runs it.
struct LayerFfn<'d, 'a> {
    decoder: &'d Decoder<'a>,
    layer: &'d Layer<'a>,
    l: usize,
}

impl<'x> moe::Parts<Input<'x>, FfnWork<'_>> for LayerFfn<'_, '_> {
    #[inline(always)]
    fn logits(&self, x: &mut Input<'x>, logits: &mut [f32]) {
        if let Some((gate, _)) = &self.layer.gate {
            gate.forward_input(x, logits);
        }
    }

    #[inline(always)]
    fn expert(&self, e: usize, x: &mut Input<'x>, y: &mut [f32], w: &mut FfnWork<'_>) -> Result<()> {
        let expert = self.decoder.expert::<false>(self.layer, self.l, e)?;
        expert.forward_with(x, 1, y, (w.g, w.u), w.xq);
        Ok(())
    }

    #[inline(always)]
    fn shared(&self, x: &mut Input<'x>, y: &mut [f32], w: &mut FfnWork<'_>) -> Option<Option<f32>> {
        let (shared, gate) = self.layer.shared.as_ref()?;
        shared.forward_with(x, 1, y, (w.g, w.u), w.xq);
        Some(gate.map(|gate| {
            let mut l = [0.0f32];
            gate.forward_input(x, &mut l);
            l[0]
        }))
    }
}

/// One decoder layer's views.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layer<'a> {
    pub(crate) attn_norm: &'a [f32],
    pub(crate) ffn_norm: &'a [f32],
    pub(crate) q: Matrix<'a>,
    pub(crate) k: Matrix<'a>,
    pub(crate) v: Matrix<'a>,
    pub(crate) o: Matrix<'a>,
    /// The router gate and router (MoE layers).
    pub(crate) gate: Option<(Matrix<'a>, Router<'a>)>,
    pub(crate) shared: Option<(SwiGlu<'a>, Option<Matrix<'a>>)>,
    pub(crate) cfg: LayerConfig,
    /// Routed expert 0's block and its length (expert `e`'s block starts
    /// `e` lengths further when every expert has expert 0's tensors).
    experts: (Block, usize),
}

/// A decoder over a parsed model's bytes. Cheap to make and `Copy`: layer
/// and expert views are made from the tensor table as each token needs them.
#[derive(Debug, Clone, Copy)]
pub struct Decoder<'a> {
    bytes: &'a [u8],
    table: Table<'a>,
    cfg: Config,
    pub(crate) embed: Matrix<'a>,
    pub(crate) final_norm: &'a [f32],
    pub(crate) lm_head: Matrix<'a>,
    /// The widest FFN and the most routed experts of any layer (the state's sizes).
    ffn: (usize, usize),
    /// Workers a step or a prefill spreads over (`std`; 1 otherwise).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    threads: usize,
}

/// Parts a decoder tensor key may have (weight, bias, int8 scale).
const PARTS: usize = SCALE_PART as usize + 1;

/// Where each (role, part) of one block of table entries (one layer and
/// expert) sits, as offsets from its first entry (`u8::MAX`: absent): one
/// scan per block, then each tensor without a search.
#[derive(Debug, Clone, Copy)]
struct Block {
    first: usize,
    at: [u8; drole::COUNT as usize * PARTS],
}

impl Block {
    /// The block of `(layer, expert)` from entry `first`, and its length.
    fn scan(t: &Table<'_>, first: usize, layer: u16, expert: u16) -> (Block, usize) {
        let (at, n) = t.scan_block::<{ drole::COUNT as usize * PARTS }, PARTS>(first, layer, expert);
        (Block { first, at }, n)
    }
}

/// How a tensor is found: in a scanned block, `shift` entries further (a
/// routed expert at expert 0's pattern), checked by its key; otherwise
/// (no block, or the key is not where the block says) by a search.
#[derive(Clone, Copy)]
struct Loc<'t, 'a> {
    t: &'t Table<'a>,
    block: Option<&'t Block>,
    shift: usize,
}

impl<'a> Loc<'_, 'a> {
    fn find(&self, key: Key) -> Option<crate::format::Tensor<'a>> {
        let slot = key.role as usize * PARTS + key.part as usize;
        if let Some(b) = self.block
            && let Some(&off) = b.at.get(slot)
            && off != u8::MAX
        {
            let i = b.first + self.shift + off as usize;
            if self.t.key(i) == Some(key) {
                return self.t.get(i);
            }
        }
        self.t.find(key)
    }

    fn need(&self, key: Key, rows: usize) -> Result<&'a [f32]> {
        Ok(Table::typed::<f32>(self.find(key), key, rows, 1)?.data)
    }
}

/// The matrix at `key`, any stored type, `(rows, cols)`; a bias (f32) if
/// `bias`. `CHECK` also scans every int8 row scale: parse does (every layer
/// and expert once); views rebuilt per token from the same validated bytes
/// check only lengths.
fn matrix<'a, const CHECK: bool>(
    t: Loc<'_, 'a>,
    key: Key,
    rows: usize,
    cols: usize,
    bias: bool,
) -> Result<Matrix<'a>> {
    let missing =
        Error::MissingTensor { layer: key.layer, expert: key.expert, role: key.role, part: key.part };
    // One search for the weights (their type decides the rest).
    let found = t.find(key).filter(|f| f.rows == rows && f.cols == cols).ok_or(missing)?;
    let w = match found.dtype {
        dtype::F32 => Weights::F32(found.slice::<f32>().ok_or(missing)?),
        dtype::F16 => Weights::F16(found.slice::<f16>().ok_or(missing)?),
        dtype::I8 => {
            // One scale a row (`(rows, 1)`), or `(rows, groups)`: a group
            // of `cols / groups` columns each (checked by `Matrix::new`).
            let skey = Key { part: SCALE_PART, ..key };
            let no_scales = Error::MissingTensor {
                layer: key.layer,
                expert: key.expert,
                role: key.role,
                part: SCALE_PART,
            };
            let st = t.find(skey).filter(|s| s.rows == rows && s.cols > 0).ok_or(no_scales)?;
            let scales = Table::typed::<f32>(Some(st), skey, rows, st.cols)?.data;
            Weights::I8 { w: found.slice::<i8>().ok_or(missing)?, scales }
        }
        _ => return Err(missing),
    };
    let b = if bias { Some(t.need(Key { part: part::BIAS, ..key }, rows)?) } else { None };
    if CHECK { Matrix::new(w, b, rows, cols) } else { Matrix::new_trusted(w, b, rows, cols) }.map_err(|e| {
        match e {
            Error::OutOfRange { what: crate::error::What::ScaleGroup, .. } => e,
            _ => missing,
        }
    })
}

fn key(layer: u16, expert: u16, role: u8) -> Key {
    Key { layer, expert, role, part: part::WEIGHT }
}

fn vector<'a>(t: Loc<'_, 'a>, key: Key, n: usize) -> Result<&'a [f32]> {
    t.need(key, n)
}

impl<'a> Decoder<'a> {
    /// Validates `bytes` as a decoder (architecture 3) in full: the
    /// container ([`Header::parse`]: length, magic, version, checksum, offsets),
    /// the decoder and layer records, every tensor entry, and every layer and
    /// expert view built once with its shapes and types. Any other
    /// architecture is [`Error::WrongArchitecture`]: stacks and multi-gate
    /// models are [`Model::parse`](crate::Model::parse)'s. Without the
    /// `decoder` cargo feature, [`Error::Disabled`].
    // Out of line, as `Model::parse`: its locals stay out of the caller's frame.
    #[inline(never)]
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let h = Header::parse(bytes)?;
        if h.arch != crate::format::arch::DECODER {
            return Err(Error::WrongArchitecture { found: h.arch });
        }
        if !cfg!(feature = "decoder") {
            return Err(Error::Disabled { feature: "decoder" });
        }
        let cfg = Config::read(bytes, h.n_layers)?;
        for l in 0..h.n_layers {
            LayerConfig::read(bytes, l)?;
        }
        if h.input_dim != cfg.vocab || h.output_dim != cfg.vocab || h.task != 0 || h.tasks != 1 {
            return Err(Error::BadField { field: Field::Dims, layer: 0 });
        }
        check_entries(bytes, (h.table_offset, h.n_tensors, h.data_offset, h.payload), |key| {
            key_allowed(bytes, &cfg, key)
        })?;
        let dec = Self::build(bytes, Table::new(bytes, h.table_offset, h.n_tensors), cfg)?;
        dec.validate()?;
        // Saturated arithmetic means a state no machine could hold.
        if dec.state_bytes() > isize::MAX as usize / 2 {
            return Err(Error::Overflow);
        }
        Ok(dec)
    }

    /// The tensor table.
    pub fn table(&self) -> &Table<'a> {
        &self.table
    }

    /// The bytes the decoder was parsed from.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    fn build(bytes: &'a [u8], table: Table<'a>, cfg: Config) -> Result<Self> {
        let embed = matrix::<true>(
            Loc { t: &table, block: None, shift: 0 },
            key(MODEL_LEVEL, LAYER_LEVEL, drole::EMBED),
            cfg.vocab,
            cfg.hidden,
            false,
        )?;
        let lm_head = if cfg.tied {
            embed
        } else {
            matrix::<true>(
                Loc { t: &table, block: None, shift: 0 },
                key(MODEL_LEVEL, LAYER_LEVEL, drole::LM_HEAD),
                cfg.vocab,
                cfg.hidden,
                false,
            )?
        };
        let final_norm = vector(
            Loc { t: &table, block: None, shift: 0 },
            key(MODEL_LEVEL, LAYER_LEVEL, drole::FINAL_NORM),
            cfg.hidden,
        )?;
        let mut ffn = (0, 0);
        for l in 0..cfg.layers {
            let lc = LayerConfig::read(bytes, l)?;
            ffn = (ffn.0.max(lc.hidden).max(lc.shared_hidden), ffn.1.max(lc.experts));
        }
        Ok(Decoder { bytes, table, cfg, embed, final_norm, lm_head, ffn, threads: 1 })
    }

    /// Builds every layer and expert view once: each tensor present with
    /// its shape and type.
    fn validate(&self) -> Result<()> {
        for l in 0..self.cfg.layers {
            let layer = self.layer::<true>(l)?;
            for e in 0..layer.cfg.experts {
                self.expert::<true>(&layer, l, e)?;
            }
        }
        Ok(())
    }

    /// The decoder record.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Layer `l`'s record.
    pub fn layer_config(&self, l: usize) -> Result<LayerConfig> {
        if l >= self.cfg.layers {
            return Err(Error::BadField { field: Field::Layers, layer: l });
        }
        LayerConfig::read(self.bytes, l)
    }

    pub(crate) fn layer<const CHECK: bool>(&self, l: usize) -> Result<Layer<'a>> {
        let lc = self.layer_config(l)?;
        let (t, c) = (&self.table, &self.cfg);
        let at = |role| key(l as u16, LAYER_LEVEL, role);
        // One search and one scan for the layer-level block, one of each
        // for routed expert 0 (the others at its pattern, `expert`).
        let (level, _) = Block::scan(t, t.lower_bound(at(0)), l as u16, LAYER_LEVEL);
        let (expert0, stride) = Block::scan(t, t.lower_bound(key(l as u16, 0, 0)), l as u16, 0);
        let level = Loc { t, block: Some(&level), shift: 0 };
        let gate = if lc.experts > 0 {
            let router = Router::new(lc.rule(), None, 1.0)?;
            Some((matrix::<CHECK>(level, at(role::GATE), lc.experts, c.hidden, false)?, router))
        } else {
            None
        };
        let shared = if lc.shared_hidden > 0 {
            let g = if lc.shared_gate {
                Some(matrix::<CHECK>(level, at(role::SHARED_GATE), 1, c.hidden, false)?)
            } else {
                None
            };
            let first = t.lower_bound(key(l as u16, SHARED_EXPERT, 0));
            let (block, _) = Block::scan(t, first, l as u16, SHARED_EXPERT);
            let at = Loc { t, block: Some(&block), shift: 0 };
            Some((self.swiglu::<CHECK>(at, l, SHARED_EXPERT, lc.shared_hidden)?, g))
        } else {
            None
        };
        Ok(Layer {
            attn_norm: vector(level, at(drole::ATTN_NORM), c.hidden)?,
            ffn_norm: vector(level, at(drole::FFN_NORM), c.hidden)?,
            q: matrix::<CHECK>(level, at(drole::Q), c.q_dim(), c.hidden, c.qkv_bias)?,
            k: matrix::<CHECK>(level, at(drole::K), c.kv_dim(), c.hidden, c.qkv_bias)?,
            v: matrix::<CHECK>(level, at(drole::V), c.kv_dim(), c.hidden, c.qkv_bias)?,
            o: matrix::<CHECK>(level, at(drole::O), c.hidden, c.q_dim(), false)?,
            gate,
            shared,
            cfg: lc,
            experts: (expert0, stride),
        })
    }

    /// The SwiGLU at `(l, e)`, found through `t`.
    fn swiglu<const CHECK: bool>(
        &self,
        t: Loc<'_, 'a>,
        l: usize,
        e: u16,
        inner: usize,
    ) -> Result<SwiGlu<'a>> {
        let h = self.cfg.hidden;
        let at = |role| key(l as u16, e, role);
        Ok(Ffn::Gated {
            gate: matrix::<CHECK>(t, at(role::GATE_PROJ), inner, h, false)?,
            up: matrix::<CHECK>(t, at(role::UP), inner, h, false)?,
            act: Activation::Silu,
            down: matrix::<CHECK>(t, at(role::DOWN), h, inner, false)?,
        })
    }

    /// Routed expert `e` of `layer` (layer `l`): where expert 0's block
    /// length puts it.
    pub(crate) fn expert<const CHECK: bool>(
        &self,
        layer: &Layer<'_>,
        l: usize,
        e: usize,
    ) -> Result<SwiGlu<'a>> {
        let (block, stride) = &layer.experts;
        let from = Loc { t: &self.table, block: Some(block), shift: e.saturating_mul(*stride) };
        self.swiglu::<CHECK>(from, l, e as u16, layer.cfg.hidden)
    }

    /// Bytes of the [`State`] this decoder needs (KV cache + work buffers).
    pub fn state_bytes(&self) -> usize {
        let (max_hidden, max_experts) = self.ffn;
        super::state::bytes(&self.cfg, max_hidden, max_experts)
    }

    /// A fresh state (position 0) in `buf`, which must hold
    /// [`Decoder::state_bytes`].
    pub fn state<'s>(&self, buf: &'s mut [u8]) -> Result<State<'s>> {
        let need = self.state_bytes();
        if buf.len() < need {
            return Err(Error::ScratchTooSmall { needed: need, actual: buf.len() });
        }
        State::new(&self.cfg, self.ffn, buf)
    }

    /// Feeds `token` at the state's position: writes the next-token logits
    /// (`vocab` wide) to `logits`, stores the position's keys and values,
    /// and advances the state. `on_layer(layer, selection)` sees the experts
    /// each layer chose, in router order (empty for dense layers).
    pub fn step(
        &self,
        state: &mut State<'_>,
        token: u32,
        logits: &mut [f32],
        on_layer: impl FnMut(usize, &Selection<f32>),
    ) -> Result<()> {
        self.step_over(None, state, token, logits, on_layer)
    }

    /// [`Decoder::step`] over `built` layer views (a [`ResolvedDecoder`]'s),
    /// or over views made from the table per layer when `None`.
    fn step_over(
        &self,
        built: Option<&[Layer<'a>]>,
        state: &mut State<'_>,
        token: u32,
        logits: &mut [f32],
        mut on_layer: impl FnMut(usize, &Selection<f32>),
    ) -> Result<()> {
        let c = &self.cfg;
        check_len(What::Output, c.vocab, logits.len())?;
        if token as usize >= c.vocab {
            return Err(Error::OutOfRange { what: What::Token, index: token as usize });
        }
        let pos = state.pos();
        if pos >= c.context {
            return Err(Error::ContextFull { context: c.context });
        }
        let (kv, mut w) = state.split(c, self.ffn)?;
        self.embed.row(token as usize, w.x);
        rope_table(pos, w.inv_freq, w.cos, w.sin);
        for l in 0..c.layers {
            let made;
            let layer = match built {
                Some(layers) => layers.get(l).ok_or(Error::WrongState)?,
                None => {
                    made = self.layer::<false>(l)?;
                    &made
                }
            };
            rms_norm(w.x, layer.attn_norm, c.rms_eps, w.xb)?;
            self.attention(layer, l, pos, kv, &mut w)?;
            rms_norm(w.x, layer.ffn_norm, c.rms_eps, w.xb)?;
            let sel = self.ffn(layer, l, &mut w)?;
            on_layer(l, &sel);
        }
        rms_norm(w.x, self.final_norm, c.rms_eps, w.xb)?;
        self.head(w.xb, logits, w.xq);
        state.advance();
        // Weights are not scanned at parse; overflowing ones show here.
        crate::error::check_finite(What::Output, logits)
    }

    /// `x += o(attention(q, cache))` for layer `l` at `pos`; `xb` holds the
    /// normalized input.
    fn attention(
        &self,
        layer: &Layer<'_>,
        l: usize,
        pos: usize,
        kv: &mut Kv<'_>,
        w: &mut Work<'_>,
    ) -> Result<()> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let mut input = Input::new(w.xb, w.xbq);
        layer.q.forward_input(&mut input, w.q);
        layer.k.forward_input(&mut input, w.k);
        layer.v.forward_input(&mut input, w.v);
        // `max(1)`: validated non-zero at parse; said again so that no
        // chunking or division below has a panic path.
        let hd = hd.max(1);
        for head in w.q.chunks_exact_mut(hd).chain(w.k.chunks_exact_mut(hd)) {
            rope(head, w.cos, w.sin);
        }
        kv.store(c, l, pos, w.k, w.v)?;
        self.heads(l, pos, kv, w.q, w.scores, w.att)?;
        layer.o.forward(w.att, w.xb, w.xq);
        w.x.iter_mut().zip(w.xb.iter()).for_each(|(x, &d)| *x += d);
        Ok(())
    }

    /// `logits = lm_head x`, its rows over the decoder's threads (`std`).
    fn head(&self, x: &[f32], logits: &mut [f32], xq: &mut [i8]) {
        #[cfg(feature = "std")]
        if self.threads > 1 {
            return self.lm_head.forward_threads(x, logits, self.threads);
        }
        self.lm_head.forward(x, logits, xq);
    }

    /// Every head's attention of the rotated queries `q` at `pos` over
    /// layer `l`'s cache up to `pos` (stored) into `att`; `scores` is work
    /// space of at least `pos + 1` values.
    fn heads(
        &self,
        l: usize,
        pos: usize,
        kv: &Kv<'_>,
        q: &[f32],
        scores: &mut [f32],
        att: &mut [f32],
    ) -> Result<()> {
        let c = &self.cfg;
        // `max(1)`: validated non-zero at parse (no panic path below).
        let hd = c.head_dim.max(1);
        let group = (c.heads / c.kv_heads.max(1)).max(1);
        let scale = 1.0 / libm::sqrtf(hd as f32);
        let short = Error::ScratchTooSmall { needed: pos + 1, actual: scores.len() };
        let scores = scores.get_mut(..=pos).ok_or(short)?;
        let slabs = kv.layer(c, l, pos + 1)?;
        let kvd = c.kv_dim();
        // Not a zip of two `chunks_exact`: its out-of-line constructor divides
        // by a chunk size it cannot see is non-zero (a panic path).
        for (h, out) in att.chunks_exact_mut(hd).enumerate() {
            let qh = q.get(h * hd..).and_then(|q| q.get(..hd)).ok_or(Error::WrongState)?;
            // This head's columns within a cached row.
            let off = h / group * hd;
            if off + hd > kvd {
                return Err(Error::WrongState);
            }
            match slabs {
                Slabs::F32(k, v) => attend(k, v, (kvd, off), qh, scores, out, scale),
                Slabs::F16(k, v) => attend(k, v, (kvd, off), qh, scores, out, scale),
            }
        }
        Ok(())
    }

    /// `x += moe(xb)`: routed experts, then the shared expert, through the
    /// one float MoE ([`moe::forward`]).
    fn ffn(&self, layer: &Layer<'_>, l: usize, w: &mut Work<'_>) -> Result<Selection<f32>> {
        #[cfg(feature = "std")]
        if self.threads > 1 && layer.gate.is_some() {
            return self.ffn_threads(layer, l, w);
        }
        let short = Error::ScratchTooSmall { needed: layer.cfg.experts, actual: w.router.len() };
        let logits = w.router.get_mut(..layer.cfg.experts).ok_or(short)?;
        // Every product below reads xb: int8 ones share one quantization.
        let mut input = Input::new(w.xb, w.xbq);
        let parts = LayerFfn { decoder: self, layer, l };
        let mut work = FfnWork { g: w.g, u: w.u, xq: w.xq };
        let router = layer.gate.as_ref().map(|(_, r)| r);
        let sel = moe::forward(&parts, router, &mut input, w.acc, (logits, w.y), &mut work)?;
        w.x.iter_mut().zip(w.acc.iter()).for_each(|(x, &d)| *x += d);
        Ok(sel)
    }
}

/// A decoder with every layer's views built once (its matrices, norms,
/// router and shared expert as borrowed slices, like llama2.c's weights
/// struct), so that a token searches no table for them; routed experts are
/// taken by position from expert 0's block. RAM: `L` layer views, 496
/// bytes each on a 32-bit Cortex-M ([`ResolvedDecoder::layer_bytes`]),
/// known at compile time. Tokens give the same logits as
/// [`Decoder::step`], bit for bit; the tiny LM on the Cortex-M4F takes
/// 2.4 % fewer instructions a token (438,018 -> 427,367).
///
/// ```
/// # #[cfg(feature = "std")] {
/// # let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders/mixtral_tied");
/// # let bytes = micromoe::host::convert_decoder(&dir, &micromoe::host::DecoderOptions::new(micromoe::host::Dtype::F32)).unwrap();
/// # let bytes = micromoe::format::write::AlignedBytes::from(&bytes[..]);
/// use micromoe::model::{Decoder, ResolvedDecoder};
/// let decoder = Decoder::parse(&bytes).unwrap();
/// let resolved = ResolvedDecoder::<4>::new(&decoder).unwrap();
/// let (mut a, mut b) = (vec![0u8; decoder.state_bytes()], vec![0u8; decoder.state_bytes()]);
/// let (mut sa, mut sb) = (decoder.state(&mut a).unwrap(), decoder.state(&mut b).unwrap());
/// let vocab = decoder.config().vocab;
/// let (mut la, mut lb) = (vec![0.0; vocab], vec![0.0; vocab]);
/// for t in [1, 5, 2] {
///     decoder.step(&mut sa, t, &mut la, |_, _| {}).unwrap();
///     resolved.step(&mut sb, t, &mut lb, |_, _| {}).unwrap();
///     assert_eq!(la, lb);
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct ResolvedDecoder<'a, const L: usize> {
    decoder: Decoder<'a>,
    layers: heapless::Vec<Layer<'a>, L>,
}

impl<'a, const L: usize> ResolvedDecoder<'a, L> {
    /// Builds every layer's views ([`Error::TooManyLayers`] if the decoder
    /// has more than `L`).
    pub fn new(decoder: &Decoder<'a>) -> Result<Self> {
        let mut r = ResolvedDecoder { decoder: *decoder, layers: heapless::Vec::new() };
        super::build_layers(&mut r.layers, decoder.cfg.layers, |l| decoder.layer::<false>(l))?;
        Ok(r)
    }

    /// Bytes one layer's views take (the RAM per layer of `L`).
    pub const fn layer_bytes() -> usize {
        core::mem::size_of::<Layer<'static>>()
    }

    /// The decoder the views were built from.
    pub fn decoder(&self) -> &Decoder<'a> {
        &self.decoder
    }

    /// [`Decoder::step`] on the built views: the same checks and bits.
    pub fn step(
        &self,
        state: &mut State<'_>,
        token: u32,
        logits: &mut [f32],
        on_layer: impl FnMut(usize, &Selection<f32>),
    ) -> Result<()> {
        self.decoder.step_over(Some(&self.layers), state, token, logits, on_layer)
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * weight` (Hugging Face `*RMSNorm`); a
/// mean square that overflowed (1/sqrt(inf) would silently zero the row) or
/// is NaN is an error.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    if !ms.is_finite() {
        let index = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::NonFinite { what: What::Hidden, index });
    }
    let r = 1.0 / libm::sqrtf(ms + eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(weight) {
        *o = g * (v * r);
    }
    Ok(())
}

/// One head's attention over the cached rows (`kvd` wide, the head's
/// `hd = q.len()` columns from `off`; `scores` has one entry per row):
/// `out = softmax(q . k_t * scale) . v`, keys and values widened to f32 as
/// they are read, in the order the products were always summed.
fn attend<E: FloatWeight>(
    k: &[E],
    v: &[E],
    (kvd, off): (usize, usize),
    q: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
    scale: f32,
) {
    let hd = q.len();
    // `get`s that cannot fail: the caller checked the slabs hold a row per
    // score and that off + hd <= kvd.
    let at = |t: usize| t * kvd + off..t * kvd + off + hd;
    for (t, s) in scores.iter_mut().enumerate() {
        let kt = k.get(at(t)).unwrap_or(&[]);
        *s = E::dot_seq(q, kt) * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (t, &p) in scores.iter().enumerate() {
        let vt = v.get(at(t)).unwrap_or(&[]);
        E::axpy(out, vt, p);
    }
}

/// In-place softmax; an all-`-inf` or empty row stays as it is.
fn softmax(s: &mut [f32]) {
    // Not `f32::max` (an `fmaxf` call per score); NaNs are passed over alike.
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        return;
    }
    // The exponentials many at a time where the host has SIMD (the same
    // bits as `libm::expf`), the sum in order.
    crate::kernels::exp_shifted(s, max);
    let sum = s.iter().fold(0.0f32, |a, &v| a + v);
    s.iter_mut().for_each(|v| *v /= sum);
}

/// The rotary embedding's inverse frequencies `theta^(-2i/d)` for `i < d/2`
/// (Hugging Face's default, computed in f32 as it does), once per state.
pub(crate) fn rope_inv_freq(c: &Config, inv_freq: &mut [f32]) {
    let d = c.head_dim as f32;
    for (i, f) in inv_freq.iter_mut().enumerate() {
        *f = 1.0 / libm::powf(c.rope_theta, (2 * i) as f32 / d);
    }
}

/// `cos`/`sin` of `pos * inv_freq[i]`.
pub(crate) fn rope_table(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for ((co, si), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        // One range reduction for both; the same bits as `cosf` and `sinf`
        // (tested below).
        (*si, *co) = libm::sincosf(pos as f32 * f);
    }
}

/// Rotates one head: pairs `(i, i + d/2)` (`rotate_half`).
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a, b) = head.split_at_mut(head.len() / 2);
    for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (v1, v2) = (*x1, *x2);
        *x1 = v1 * c - v2 * s;
        *x2 = v2 * c + v1 * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_position_zero_is_identity() {
        let mut h = [1.0, 2.0, 3.0, 4.0];
        rope(&mut h, &[1.0, 1.0], &[0.0, 0.0]);
        assert_eq!(h, [1.0, 2.0, 3.0, 4.0]);
        // A quarter turn maps (x1, x2) to (-x2, x1).
        rope(&mut h, &[0.0, 0.0], &[1.0, 1.0]);
        assert_eq!(h, [-3.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn sincosf_is_sinf_and_cosf() {
        // Every 997th bit pattern (both signs, all exponents, NaNs and
        // infinities included) and every position angle a 4k context makes
        // (far fewer under Miri, which interprets each operation).
        let step = if cfg!(miri) { 3_999_971 } else { 997 };
        let angles = (0..=u32::MAX / step).map(|i| f32::from_bits(i * step));
        let positions = (0..if cfg!(miri) { 64 } else { 4096 }).map(|p| p as f32 * 0.7);
        for a in angles.chain(positions) {
            // Bits, except that a NaN is any NaN (Rust leaves their payload open).
            let same = |x: f32, y: f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
            let (s, c) = libm::sincosf(a);
            assert!(same(s, libm::sinf(a)), "sin {a:e}");
            assert!(same(c, libm::cosf(a)), "cos {a:e}");
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut s = [1.0, 2.0, 3.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }

    #[test]
    fn rms_norm_unit_weights() {
        let mut out = [0.0; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out).unwrap();
        assert!(rms_norm(&[3e38, 3e38], &[1.0, 1.0], 0.0, &mut out).is_err());
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
