//! The stack and multi-gate graphs over a parsed container: [`Model`]
//! validates every layer record and tensor a graph needs, and runs them.

use super::layers::{self, IntPath, Layer};
use crate::error::{Error, Field, Result, What, check_len};
use crate::format::layout::{self, HEADER_LEN, LAYER_LEN, header, header_usize, layer as lw, layer_word};
use crate::format::{Elem, Header, LayerDtype, MAGIC, MAX_DIM, MAX_LAYERS, Table, arch, check_entries};
use crate::kernels::{Activation, IntKernel};
use crate::moe::Combine;
use crate::quant::{Multiplier, QuantParams};
use crate::router::Selection;
use crate::scratch::{Carve, bytes_for};

/// Everything a layer record says, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LayerInfo {
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// Hidden width of each routed expert.
    pub hidden: usize,
    /// Routed experts.
    pub experts: usize,
    /// Experts chosen per token.
    pub k: usize,
    /// [`layout::flags`].
    pub flags: u32,
    /// Expert non-linearity.
    pub act: Activation,
    /// Numeric type of the gate.
    pub gate_dtype: LayerDtype,
    /// Numeric type of the experts.
    pub expert_dtype: LayerDtype,
    /// Hidden width of the shared expert (0 without one).
    pub shared_hidden: usize,
    /// Expert groups (0 or 1: none).
    pub n_group: usize,
    /// Groups kept.
    pub topk_group: usize,
    /// Routed scaling factor.
    pub scaling: f32,
    /// The same in Q15.
    pub scaling_q15: i32,
    /// Input quantization (integer layers).
    pub input: QuantParams,
    /// Output quantization (integer layers).
    pub output: QuantParams,
    /// Combine parameters (integer layers).
    pub combine: Combine,
    /// The layer whose routed experts this one uses (usually itself).
    pub experts_from: usize,
}

impl LayerInfo {
    /// Weight and bias bytes per routed expert, and of the whole layer.
    pub fn is_int(&self) -> bool {
        self.expert_dtype.is_int()
    }
}

fn act_from(code: u32) -> Option<Activation> {
    Some(match code {
        0 => Activation::Relu,
        1 => Activation::Gelu,
        2 => Activation::GeluTanh,
        3 => Activation::Silu,
        _ => return None,
    })
}

/// Scratch bytes `Model::infer` needs for the model in `bytes`, from the
/// header and layer records alone; usable in `const` context, so firmware can
/// size a `static` buffer at compile time (see [`scratch_len!`](crate::scratch_len)).
/// Malformed records give an error here and a full diagnosis in
/// [`Model::parse`].
pub const fn required_scratch(bytes: &[u8]) -> core::result::Result<usize, Error> {
    scratch_for(bytes, true)
}

/// Scratch bytes [`Model::infer_int`] (and [`Resolved::infer_int`]) need:
/// [`required_scratch`] without the two f32 activation buffers of the float
/// edges (see [`scratch_len_int!`](crate::scratch_len_int)). For a decoder,
/// its state bytes, as [`required_scratch`].
pub const fn required_scratch_int(bytes: &[u8]) -> core::result::Result<usize, Error> {
    scratch_for(bytes, false)
}

const fn scratch_for(bytes: &[u8], float_edges: bool) -> core::result::Result<usize, Error> {
    let mut i = 0;
    while i < 8 {
        if bytes.len() <= i || bytes[i] != MAGIC[i] {
            return Err(Error::BadMagic);
        }
        i += 1;
    }
    let n_layers = match header_usize(bytes, header::N_LAYERS, Field::Layers) {
        Ok(n) if n >= 1 && n <= MAX_LAYERS => n,
        Ok(_) => return Err(Error::BadField { field: Field::Layers, layer: 0 }),
        Err(e) => return Err(e),
    };
    if let Ok(3) = header_usize(bytes, header::ARCH, Field::Arch) {
        return decoder_state_bytes(bytes, n_layers);
    }
    let mut max_dim = match header_usize(bytes, header::INPUT_DIM, Field::Dims) {
        Ok(n) => n,
        Err(e) => return Err(e),
    };
    let mut layer_max = 0usize;
    let mut l = 0;
    while l < n_layers {
        let (Some(inp), Some(gdt)) =
            (layer_word(bytes, HEADER_LEN, l, lw::IN_DIM), layer_word(bytes, HEADER_LEN, l, lw::GATE_DTYPE))
        else {
            return Err(Error::Truncated { needed: HEADER_LEN + (l + 1) * LAYER_LEN, actual: bytes.len() });
        };
        // A float gate over integer experts dequantizes the input first.
        let float_gate = matches!(LayerDtype::from_code(gdt), Some(LayerDtype::F32 | LayerDtype::F16));
        let (Some(out), Some(hidden), Some(e), Some(k), Some(fl), Some(dt), Some(sh)) = (
            layer_word(bytes, HEADER_LEN, l, lw::OUT_DIM),
            layer_word(bytes, HEADER_LEN, l, lw::HIDDEN),
            layer_word(bytes, HEADER_LEN, l, lw::EXPERTS),
            layer_word(bytes, HEADER_LEN, l, lw::K),
            layer_word(bytes, HEADER_LEN, l, lw::FLAGS),
            layer_word(bytes, HEADER_LEN, l, lw::EXPERT_DTYPE),
            layer_word(bytes, HEADER_LEN, l, lw::SHARED_HIDDEN),
        ) else {
            return Err(Error::Truncated { needed: HEADER_LEN + (l + 1) * LAYER_LEN, actual: bytes.len() });
        };
        let (out, e, k) = (out as usize, e as usize, k as usize);
        let buffers = if fl & layout::flags::GATED != 0 { 2 } else { 1 };
        let shared = if fl & layout::flags::SHARED != 0 { sh as usize } else { 0 };
        let hidden = if shared > hidden as usize { shared } else { hidden as usize };
        let hidden_max = hidden.saturating_mul(buffers);
        let slots = k.saturating_add(1).saturating_mul(out);
        // The integer kernels' work buffer covers the widest input read.
        let widest = if inp as usize > hidden_max { inp as usize } else { hidden_max };
        let work = bytes_for::<u32>(crate::kernels::expand_words(widest));
        let need = match LayerDtype::from_code(dt) {
            Some(LayerDtype::Int8) => bytes_for::<i32>(e)
                .saturating_add(bytes_for::<i8>(hidden_max))
                .saturating_add(bytes_for::<i8>(slots))
                .saturating_add(work)
                .saturating_add(if float_gate { bytes_for::<f32>(inp as usize) } else { 0 }),
            Some(LayerDtype::Q15) => bytes_for::<i32>(e)
                .saturating_add(bytes_for::<i16>(hidden_max))
                .saturating_add(bytes_for::<i16>(slots))
                .saturating_add(work)
                .saturating_add(if float_gate { bytes_for::<f32>(inp as usize) } else { 0 }),
            Some(_) => bytes_for::<f32>(e)
                .saturating_add(bytes_for::<f32>(hidden_max))
                .saturating_add(bytes_for::<f32>(out)),
            None => return Err(Error::BadField { field: Field::Dtype, layer: l }),
        };
        if need > layer_max {
            layer_max = need;
        }
        if out > max_dim {
            max_dim = out;
        }
        l += 1;
    }
    let floats = if float_edges { bytes_for::<f32>(max_dim).saturating_mul(2) } else { 0 };
    let acts = floats.saturating_add(bytes_for::<i16>(max_dim).saturating_mul(2));
    Ok(acts.saturating_add(layer_max))
}

/// [`required_scratch`] of a decoder: its [`State`](crate::model::State) bytes.
const fn decoder_state_bytes(bytes: &[u8], n_layers: usize) -> core::result::Result<usize, Error> {
    use layout::decoder as dl;
    let truncated = Error::Truncated { needed: HEADER_LEN + dl::LEN, actual: bytes.len() };
    const fn w(bytes: &[u8], i: usize) -> Option<u32> {
        layout::u32_at(bytes, HEADER_LEN + 4 * i)
    }
    let (Some(vocab), Some(hidden), Some(heads), Some(kv_heads), Some(head_dim), Some(context), Some(flags)) = (
        w(bytes, dl::VOCAB),
        w(bytes, dl::HIDDEN),
        w(bytes, dl::HEADS),
        w(bytes, dl::KV_HEADS),
        w(bytes, dl::HEAD_DIM),
        w(bytes, dl::CONTEXT),
        w(bytes, dl::FLAGS),
    ) else {
        return Err(truncated);
    };
    let (mut max_hidden, mut max_experts) = (0usize, 0usize);
    let mut l = 0;
    while l < n_layers {
        let (Some(e), Some(h), Some(sh)) = (
            layer_word(bytes, HEADER_LEN + dl::LEN, l, dl::layer::EXPERTS),
            layer_word(bytes, HEADER_LEN + dl::LEN, l, dl::layer::HIDDEN),
            layer_word(bytes, HEADER_LEN + dl::LEN, l, dl::layer::SHARED_HIDDEN),
        ) else {
            return Err(Error::Truncated {
                needed: HEADER_LEN + dl::LEN + (l + 1) * LAYER_LEN,
                actual: bytes.len(),
            });
        };
        let (e, h, sh) = (e as usize, h as usize, sh as usize);
        if h > max_hidden {
            max_hidden = h;
        }
        if sh > max_hidden {
            max_hidden = sh;
        }
        if e > max_experts {
            max_experts = e;
        }
        l += 1;
    }
    Ok(crate::model::bytes_for_dims(
        (vocab as usize, hidden as usize, heads as usize, kv_heads as usize, head_dim as usize),
        context as usize,
        n_layers,
        flags & dl::flags::KV_F16 != 0,
        max_hidden,
        max_experts,
    ))
}

/// A validated model: every offset, size, shape, code and the checksum checked.
/// Nothing reachable from it panics.
#[derive(Debug, Clone, Copy)]
pub struct Model<'a> {
    bytes: &'a [u8],
    table: Table<'a>,
    /// `required_scratch` of the bytes, computed once.
    scratch: usize,
    /// `required_scratch_int` of the bytes.
    scratch_int: usize,
    /// Widest activation between layers.
    max_dim: usize,
    n_layers: usize,
    tasks: usize,
    input_dim: usize,
    output_dim: usize,
    task: u32,
    arch: u32,
}

/// What happened in one layer during [`Model::infer_observed`].
#[derive(Debug, Clone, Copy)]
pub struct Step<'s> {
    /// Layer index.
    pub layer: usize,
    /// Experts chosen and their weights (integer layers: Q15 / 32768).
    pub selection: &'s Selection<f32>,
    /// Multiply-accumulates done.
    pub macs: u64,
    /// Multiply-accumulates with every expert active.
    pub macs_dense: u64,
}

impl<'a> Model<'a> {
    /// Validates `bytes` in full: length, magic, version, checksum, alignment,
    /// header and layer fields, every tensor entry's codes, order, alignment,
    /// bounds and size, and that every layer finds each tensor it needs with
    /// the right shape and type (no size arithmetic can overflow).
    // Out of line: inlined into the caller, parse's locals would stay in
    // the caller's frame through every inference that follows.
    #[inline(never)]
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let h = Header::parse(bytes)?;
        let Header {
            arch,
            task,
            n_layers,
            n_tensors,
            table_offset,
            data_offset,
            payload,
            input_dim,
            output_dim,
            tasks,
        } = h;
        if arch == arch::DECODER {
            // A decoder is `Decoder::parse`'s (the graphs differ by type).
            return Err(Error::WrongArchitecture { found: arch });
        }
        if arch == arch::MULTI_GATE && !cfg!(feature = "mmoe") {
            return Err(Error::Disabled { feature: "mmoe" });
        }
        // At least 1 (`Header::parse` checked tasks >= 1 divides n_layers >=
        // 1); the `max`es say so to the compiler, which then links no
        // division-by-zero panic.
        let per_task = (n_layers / tasks.max(1)).max(1);
        // Layer records are re-read where needed rather than kept: parsing
        // must not cost a microcontroller kilobytes of stack.
        let mut total_out = 0usize;
        let mut prev_out = input_dim;
        for l in 0..n_layers {
            let info = layer_info(bytes, l)?;
            for dtype in [info.gate_dtype, info.expert_dtype] {
                if let Some(feature) = disabled(dtype) {
                    return Err(Error::Disabled { feature });
                }
            }
            if info.flags & layout::flags::SHARED != 0 && !cfg!(feature = "shared") {
                return Err(Error::Disabled { feature: "shared" });
            }
            if l % per_task == 0 {
                prev_out = input_dim;
            }
            if info.in_dim != prev_out {
                return Err(Error::BadField { field: Field::Dims, layer: l });
            }
            if info.experts_from != l {
                let src =
                    layer_info(bytes, info.experts_from).ok().filter(|s| s.experts_from == info.experts_from);
                if !src.is_some_and(|s| same_experts(&s, &info)) {
                    return Err(Error::BadField { field: Field::Routing, layer: l });
                }
            }
            prev_out = info.out_dim;
            if l % per_task == per_task - 1 {
                total_out += prev_out;
            }
        }
        if total_out != output_dim {
            return Err(Error::BadField { field: Field::Dims, layer: n_layers - 1 });
        }
        // Records were validated above; entries come layer by layer, so the
        // last record read serves the next entries.
        let mut last: Option<(u16, (usize, usize, u32))> = None;
        check_entries(bytes, (table_offset, n_tensors, data_offset, payload), |key| {
            if key.layer as usize >= n_layers {
                return Ok(false);
            }
            let (experts, experts_from, flags) = match last {
                Some((l, fields)) if l == key.layer => fields,
                _ => {
                    let i = read_layer(bytes, key.layer as usize)?;
                    (i.experts, i.experts_from, i.flags)
                }
            };
            last = Some((key.layer, (experts, experts_from, flags)));
            let expert_ok = ((key.expert as usize) < experts && experts_from == key.layer as usize)
                || key.expert == layout::LAYER_LEVEL
                || (key.expert == layout::SHARED_EXPERT && flags & layout::flags::SHARED != 0);
            Ok(expert_ok && key.role < layout::role::COUNT && key.part < layout::part::COUNT)
        })?;
        let max_dim = (0..n_layers)
            .map(|l| read_layer(bytes, l).map(|i| i.out_dim))
            .try_fold(input_dim, |m, d| d.map(|d| m.max(d)))?;
        let model = Model {
            bytes,
            table: Table::new(bytes, table_offset, n_tensors),
            scratch: required_scratch(bytes)?,
            scratch_int: required_scratch_int(bytes)?,
            max_dim,
            n_layers,
            tasks,
            input_dim,
            output_dim,
            task,
            arch,
        };
        for l in 0..n_layers {
            layers::validate(&model.table, l, &read_layer(bytes, l)?)?;
        }
        Ok(model)
    }

    /// Architecture code ([`arch`]).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// The bytes the model was parsed from.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The tensor table.
    pub fn table(&self) -> &Table<'a> {
        &self.table
    }

    /// Number of MoE layers.
    pub fn layers(&self) -> usize {
        self.n_layers
    }

    /// Number of tasks: 1 for a stack of layers; for multi-gate MoE, the
    /// number of chains (gate + tower) over the shared experts.
    pub fn tasks(&self) -> usize {
        self.tasks
    }

    /// Input width.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Output width.
    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// True for classifiers (the answer is the argmax of the output).
    pub fn is_classifier(&self) -> bool {
        self.task == 0
    }

    /// Layer `i`'s record.
    pub fn layer_info(&self, i: usize) -> Result<LayerInfo> {
        if i >= self.n_layers {
            return Err(Error::OutOfRange { what: What::Layer, index: i });
        }
        layer_info(self.bytes, i)
    }

    /// Layer `i`, runnable. Building it costs a few table look-ups; keep it
    /// for many tokens.
    pub fn layer(&self, i: usize) -> Result<Layer<'a>> {
        if i >= self.n_layers {
            return Err(Error::OutOfRange { what: What::Layer, index: i });
        }
        layers::build::<false>(&self.table, i, &read_layer(self.bytes, i)?)
    }

    /// Scratch bytes [`Model::infer`] needs (= [`required_scratch`]).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch
    }

    /// Scratch bytes [`Model::infer_int`] needs (= [`required_scratch_int`]:
    /// no room for float edges; any buffer of [`Model::scratch_bytes`] does too).
    pub fn int_scratch_bytes(&self) -> usize {
        self.scratch_int
    }

    /// Runs one input through every layer: `x` (input width) to `out`
    /// (output width), f32 at the edges; integer layers quantize their input
    /// and dequantize their output with the parameters stored in the model.
    /// [`Model::infer_observed`] also shows each layer's choice and work;
    /// [`Model::infer_int`] runs an integer model on integers end to end.
    pub fn infer(&self, x: &[f32], out: &mut [f32], scratch: &mut [u8]) -> Result<()> {
        self.infer_observed(x, out, scratch, |_| {})
    }

    /// [`Model::infer`], and `on_step` sees each layer's choice and work.
    pub fn infer_observed(
        &self,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut [u8],
        mut on_step: impl FnMut(Step<'_>),
    ) -> Result<()> {
        check_len(What::Input, self.input_dim, x.len())?;
        check_len(What::Output, self.output_dim, out.len())?;
        crate::error::check_finite(What::Input, x)?;
        let need = self.scratch_bytes();
        if scratch.len() < need {
            return Err(Error::ScratchTooSmall { needed: need, actual: scratch.len() });
        }
        let max_dim = self.max_dim;
        let mut carve = Carve::new(scratch);
        let mut a = carve.take::<f32>(max_dim)?;
        let mut b = carve.take::<f32>(max_dim)?;
        let qa = carve.take::<u8>(bytes_for::<i16>(max_dim))?;
        let qb = carve.take::<u8>(bytes_for::<i16>(max_dim))?;
        let layer_scratch = carve.rest();
        let per_task = self.n_layers / self.tasks.max(1);
        let mut written = 0;
        let short = |n: usize| Error::ScratchTooSmall { needed: n, actual: max_dim };
        for task in 0..self.tasks {
            a.get_mut(..x.len()).ok_or(short(x.len()))?.copy_from_slice(x);
            let mut width = x.len();
            for l in task * per_task..(task + 1) * per_task {
                // Records and tensors were checked at parse: read, not re-validated.
                let info = read_layer(self.bytes, l)?;
                let (x, y) = (a.get(..width).ok_or(short(width))?, &mut *b);
                let (sel, out_w, macs) = layers::run(&self.table, l, &info, x, y, (qa, qb), layer_scratch)?;
                on_step(Step { layer: l, selection: &sel, macs: macs.0, macs_dense: macs.1 });
                width = out_w;
                core::mem::swap(&mut a, &mut b);
            }
            let Some(dst) = out.get_mut(written..written + width) else {
                return Err(Error::Shape {
                    what: What::Output,
                    expected: written + width,
                    actual: out.len(),
                });
            };
            dst.copy_from_slice(a.get(..width).ok_or(short(width))?);
            written += width;
        }
        // Float weights far out of range overflow to infinity: an error,
        // not an output.
        crate::error::check_finite(What::Hidden, out)
    }
}

/// The cargo feature a layer's numeric type needs, if this build leaves it out.
const fn disabled(dtype: LayerDtype) -> Option<&'static str> {
    match dtype {
        LayerDtype::F32 if !cfg!(feature = "f32") => Some("f32"),
        LayerDtype::F16 if !cfg!(feature = "f16") => Some("f16"),
        LayerDtype::Int8 if !cfg!(feature = "int8") => Some("int8"),
        LayerDtype::Q15 if !cfg!(feature = "q15") => Some("q15"),
        _ => None,
    }
}

/// The layer type whose activations are `A` (int8 or Q15).
fn int_dtype<A: IntKernel>() -> LayerDtype {
    if A::LUT_LEN == 256 { LayerDtype::Int8 } else { LayerDtype::Q15 }
}

/// Layer `l`'s record, every field validated (parse, and the public
/// accessor).
fn layer_info(bytes: &[u8], l: usize) -> Result<LayerInfo> {
    let info = read_layer(bytes, l)?;
    check_record(bytes, l, &info)?;
    Ok(info)
}

/// Layer `l`'s record as it is (every inference reads records parse has
/// checked): only the codes that become enums are refused.
fn read_layer(bytes: &[u8], l: usize) -> Result<LayerInfo> {
    let rec = record(bytes, l)?;
    // Word `i` of the record: a fixed offset into a 96-byte array, so no
    // bounds check and no `Result` per word.
    let w = |i: usize| {
        let b = rec.as_chunks::<4>().0.get(i).copied().unwrap_or([0; 4]);
        u32::from_le_bytes(b)
    };
    let bad = |field| Error::BadField { field, layer: l };
    let flags = w(lw::FLAGS);
    let dtype = |word| LayerDtype::from_code(w(word)).ok_or(bad(Field::Dtype));
    let (gate_dtype, expert_dtype) = (dtype(lw::GATE_DTYPE)?, dtype(lw::EXPERT_DTYPE)?);
    let shared_hidden = if flags & layout::flags::SHARED != 0 { w(lw::SHARED_HIDDEN) as usize } else { 0 };
    let f32_at = |word| f32::from_bits(w(word));
    let is_int = expert_dtype.is_int();
    let quant = |scale_word, zp_word| {
        if is_int {
            QuantParams { scale: f32_at(scale_word), zero_point: w(zp_word) as i32 }
        } else {
            QuantParams { scale: 1.0, zero_point: 0 }
        }
    };
    let combine = layers::combine(
        w(lw::EXPERT_ZP) as i32,
        w(lw::COMBINE_MULT) as i32,
        w(lw::COMBINE_SHIFT) as i32,
        w(lw::OUT_ZP) as i32,
    );
    Ok(LayerInfo {
        in_dim: w(lw::IN_DIM) as usize,
        out_dim: w(lw::OUT_DIM) as usize,
        hidden: w(lw::HIDDEN) as usize,
        experts: w(lw::EXPERTS) as usize,
        k: w(lw::K) as usize,
        flags,
        act: act_from(w(lw::ACT)).ok_or(bad(Field::Activation))?,
        gate_dtype,
        expert_dtype,
        shared_hidden,
        n_group: w(lw::N_GROUP) as usize,
        topk_group: w(lw::TOPK_GROUP) as usize,
        scaling: f32_at(lw::SCALING),
        scaling_q15: w(lw::SCALING_Q15) as i32,
        input: quant(lw::IN_SCALE, lw::IN_ZP),
        output: quant(lw::OUT_SCALE, lw::OUT_ZP),
        combine,
        experts_from: w(lw::EXPERTS_FROM) as usize,
    })
}

/// Layer `l`'s 96-byte record, or `Truncated` past the end of `bytes`.
fn record(bytes: &[u8], l: usize) -> Result<&[u8; LAYER_LEN]> {
    let truncated = || Error::Truncated { needed: HEADER_LEN + (l + 1) * LAYER_LEN, actual: bytes.len() };
    let at = l.checked_mul(LAYER_LEN).and_then(|o| o.checked_add(HEADER_LEN)).ok_or_else(truncated)?;
    bytes.get(at..).and_then(|b| b.first_chunk::<LAYER_LEN>()).ok_or_else(truncated)
}

/// What parse holds a record `info` (layer `l`, read by [`read_layer`]) to:
/// widths, flags, codes, quantization, routing and zero reserved words.
#[inline(never)]
fn check_record(bytes: &[u8], l: usize, info: &LayerInfo) -> Result<()> {
    let bad = |field| Err(Error::BadField { field, layer: l });
    let dim_ok = |v: usize| (1..=MAX_DIM).contains(&v);
    let shared = info.flags & layout::flags::SHARED != 0;
    if ![info.in_dim, info.out_dim, info.hidden].into_iter().all(dim_ok)
        || (shared && !dim_ok(info.shared_hidden))
    {
        return bad(Field::Dims);
    }
    if info.flags & !layout::flags::ALL != 0 {
        return bad(Field::Routing);
    }
    // An integer gate routes only its own type of experts; a float gate routes any.
    if info.gate_dtype.is_int() && info.gate_dtype != info.expert_dtype {
        return bad(Field::Dtype);
    }
    // Expert ids 0xFFFE and 0xFFFF name the shared expert and the layer.
    if info.experts >= layout::SHARED_EXPERT as usize || info.experts_from > l {
        return bad(Field::Routing);
    }
    if !info.scaling.is_finite() {
        return bad(Field::Quant);
    }
    if info.expert_dtype.is_int() {
        let m = info.combine.multiplier;
        let quant_ok = |q: QuantParams| QuantParams::new(q.scale, q.zero_point).is_ok();
        if !quant_ok(info.input) || !quant_ok(info.output) || Multiplier::new(m.multiplier, m.shift).is_err()
        {
            return bad(Field::Quant);
        }
    }
    if record(bytes, l)?.get(4 * lw::RESERVED..).is_none_or(|r| r.iter().any(|&b| b != 0)) {
        return bad(Field::Reserved);
    }
    if layers::rule(info).validate().is_err() {
        return bad(Field::Routing);
    }
    Ok(())
}

/// Layer `b` may route over layer `a`'s experts.
fn same_experts(a: &LayerInfo, b: &LayerInfo) -> bool {
    let shape = layout::flags::GATED | layout::flags::BIASES;
    a.in_dim == b.in_dim
        && a.out_dim == b.out_dim
        && a.hidden == b.hidden
        && a.experts == b.experts
        && a.act == b.act
        && a.expert_dtype == b.expert_dtype
        && a.flags & shape == b.flags & shape
        && (!a.is_int() || a.combine.expert_zp == b.combine.expert_zp)
}

impl Model<'_> {
    /// Quantization of the model input on the integer path: layer 0's
    /// input parameters (`q = clamp(round(x / scale) + zero_point)`, as
    /// [`QuantParams::quantize`]), `None` for a float first layer. The digits model, for example, takes `pixel / 16`.
    pub fn input_quant(&self) -> Option<QuantParams> {
        let info = self.layer_info(0).ok()?;
        info.is_int().then_some(info.input)
    }

    /// Quantization of the output [`Model::infer_int`] returns: the last
    /// layer's output parameters (`None` as for [`Model::input_quant`], and
    /// for multi-gate models).
    pub fn output_quant(&self) -> Option<QuantParams> {
        let info = self.layer_info(self.n_layers.checked_sub(1)?).ok()?;
        (info.is_int() && self.tasks == 1).then_some(info.output)
    }

    /// Runs one input on the integer path end to end: `x` quantized with
    /// [`Model::input_quant`], `out` quantized with
    /// [`Model::output_quant`]; `A` is `i8` for int8 models, `i16` for Q15.
    /// No float conversion at the edges (a float gate inside a layer still
    /// runs in float). Bit for bit what [`Model::infer`] computes between
    /// its quantization and dequantization. Needs a stack (one task) whose
    /// every layer has experts of type `A` and takes the quantization the
    /// previous one gives ([`Error::IntegerPath`] names the first layer that
    /// does not). The class of a classifier is [`argmax`] of `out`.
    pub fn infer_int<A: IntPath>(&self, x: &[A], out: &mut [A], scratch: &mut [u8]) -> Result<()>
    where
        A::Bias: Elem,
    {
        self.int_path(x, out, scratch, |l, info, x, y, rest| {
            layers::run_int_only(&self.table, l, info, x, y, rest)
        })
    }

    /// The integer path's checks, buffers and layer loop; `run(l, info, x,
    /// y, scratch)` runs layer `l` (`y` its output width).
    fn int_path<A: IntPath>(
        &self,
        x: &[A],
        out: &mut [A],
        scratch: &mut [u8],
        mut run: impl FnMut(usize, &LayerInfo, &[A], &mut [A], &mut [u8]) -> Result<()>,
    ) -> Result<()>
    where
        A::Bias: Elem,
    {
        if self.arch != arch::MOE_STACK {
            return Err(Error::WrongArchitecture { found: self.arch });
        }
        check_len(What::Input, self.input_dim, x.len())?;
        check_len(What::Output, self.output_dim, out.len())?;
        let need = self.int_scratch_bytes();
        if scratch.len() < need {
            return Err(Error::ScratchTooSmall { needed: need, actual: scratch.len() });
        }
        // The two quantized activation buffers, then the layers' scratch
        // (`infer`'s layout without its two f32 buffers).
        let mut carve = Carve::new(scratch);
        let qa = carve.take::<u8>(bytes_for::<i16>(self.max_dim))?;
        let qb = carve.take::<u8>(bytes_for::<i16>(self.max_dim))?;
        let rest = carve.rest();
        let mut a = Carve::new(qa).take::<A>(self.max_dim)?;
        let mut b = Carve::new(qb).take::<A>(self.max_dim)?;
        let short = |n: usize| Error::ScratchTooSmall { needed: n, actual: self.max_dim };
        a.get_mut(..x.len()).ok_or(short(x.len()))?.copy_from_slice(x);
        let (mut width, mut prev) = (x.len(), None);
        for l in 0..self.n_layers {
            let info = read_layer(self.bytes, l)?;
            if info.expert_dtype != int_dtype::<A>() || prev.is_some_and(|p| p != info.input) {
                return Err(Error::IntegerPath { layer: l });
            }
            let y = b.get_mut(..info.out_dim).ok_or(short(info.out_dim))?;
            run(l, &info, a.get(..width).ok_or(short(width))?, y, rest)?;
            (width, prev) = (info.out_dim, Some(info.output));
            core::mem::swap(&mut a, &mut b);
        }
        let len = out.len();
        let dst =
            out.get_mut(..width).ok_or(Error::Shape { what: What::Output, expected: width, actual: len })?;
        dst.copy_from_slice(a.get(..width).ok_or(short(width))?);
        Ok(())
    }
}

/// A stack model with every layer's views built once, when it is made: an
/// inference then searches no table and builds no view, it runs the layers
/// (the firmware path; [`Model`]'s own calls rebuild each layer's views
/// from their positions in the table on every call, in no RAM). Room for
/// `L` layers in place: `L * size_of::<Layer>()` bytes wherever the
/// `Resolved` lives (a `static`, or `main`'s stack), known at compile time;
/// about 300 bytes per int8 or Q15 layer on a 32-bit MCU (a shared expert's
/// views are made when needed, not held).
///
/// ```
/// const MODEL: &[u8] = micromoe::include_model!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_int8.moe"));
/// let model = micromoe::Model::parse(MODEL).unwrap();
/// let resolved = micromoe::model::Resolved::<1>::new(&model).unwrap();
/// let input = model.input_quant().unwrap();
/// let x: Vec<i8> = (0..64).map(|i| input.quantize((i % 17) as f32 / 16.0)).collect();
/// let (mut a, mut b) = ([0i8; 10], [0i8; 10]);
/// let mut scratch = [0u8; micromoe::scratch_len!(MODEL)];
/// resolved.infer_int(&x, &mut a, &mut scratch).unwrap();
/// model.infer_int(&x, &mut b, &mut scratch).unwrap();
/// assert_eq!(a, b);
/// ```
#[derive(Debug)]
pub struct Resolved<'a, const L: usize> {
    model: Model<'a>,
    layers: heapless::Vec<Layer<'a>, L>,
}

impl<'a, const L: usize> Resolved<'a, L> {
    /// Builds every layer of `model` ([`Error::TooManyLayers`] if it has
    /// more than `L`). Returned by value: where the stack is tight,
    /// [`Resolved::build`] into an `empty` one saves the copy.
    pub fn new(model: &Model<'a>) -> Result<Self> {
        let mut r = Self::empty(*model);
        r.build()?;
        Ok(r)
    }

    /// `model` with no layer built yet: [`Resolved::build`] builds them
    /// in place.
    pub const fn empty(model: Model<'a>) -> Self {
        Resolved { model, layers: heapless::Vec::new() }
    }

    /// Builds every layer of the model in place (again, if they were).
    // Out of line, as `Model::parse`: the building's locals stay out of the
    // caller's frame.
    #[inline(never)]
    pub fn build(&mut self) -> Result<()> {
        let model = self.model;
        super::build_layers(&mut self.layers, model.n_layers, |l| {
            layers::build::<false>(&model.table, l, &read_layer(model.bytes, l)?)
        })
    }

    /// The model the layers were built from.
    pub fn model(&self) -> &Model<'a> {
        &self.model
    }

    /// The built layers.
    pub fn layers(&self) -> &[Layer<'a>] {
        &self.layers
    }

    /// [`Model::infer_int`] on the built layers: the same checks and bits.
    // Out of line: its frame is the inference's, not the caller's.
    #[inline(never)]
    pub fn infer_int<A: IntPath>(&self, x: &[A], out: &mut [A], scratch: &mut [u8]) -> Result<()>
    where
        A::Bias: Elem,
    {
        self.model.int_path(x, out, scratch, |l, _, x, y, rest| {
            let q = self.layers.get(l).and_then(A::layer).ok_or(Error::IntegerPath { layer: l })?;
            q.infer(x, y, rest).map(|_| ())
        })
    }
}

/// The index of the largest score (the first of equals), `None` for an
/// empty slice or one of NaNs only: the class a classifier's scores name,
/// float ([`Model::infer`]) or quantized ([`Model::infer_int`]: the scale
/// is positive, so the order is the same).
///
/// ```
/// assert_eq!(micromoe::argmax(&[0.1, 2.0, -1.0, 2.0]), Some(1));
/// assert_eq!(micromoe::argmax(&[-3i8, 7, 7]), Some(1));
/// assert_eq!(micromoe::argmax::<f32>(&[]), None);
/// ```
pub fn argmax<T: PartialOrd + Copy>(scores: &[T]) -> Option<usize> {
    let mut best: Option<(usize, T)> = None;
    for (i, &v) in scores.iter().enumerate() {
        // `v == v` is false for NaN only.
        #[allow(clippy::eq_op)]
        let number = v == v;
        if number && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

impl Model<'_> {
    /// [`Model::infer`] for a classifier, returning the class (the argmax
    /// of the scores, which are left in `scores`). A regressor is refused
    /// ([`Error::WrongArchitecture`]).
    pub fn classify(&self, x: &[f32], scores: &mut [f32], scratch: &mut [u8]) -> Result<usize> {
        if !self.is_classifier() {
            return Err(Error::WrongArchitecture { found: self.arch });
        }
        self.infer(x, scores, scratch)?;
        // Scores are finite (checked by `infer`) and there is at least one.
        argmax(scores).ok_or(Error::Shape { what: What::Output, expected: 1, actual: 0 })
    }
}

/// The scratch length a model (a `const` byte slice) needs, as a constant:
/// a malformed model, or a `static` buffer declared from a smaller number,
/// fails to compile instead of failing in the field.
///
/// ```
/// const MODEL: &[u8] = micromoe::include_model!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_int8.moe"));
/// const SCRATCH: usize = micromoe::scratch_len!(MODEL);
/// // On a microcontroller: a `static` (behind a critical-section Mutex) or a stack array.
/// let mut scratch = [0u8; SCRATCH];
/// let model = micromoe::Model::parse(MODEL).unwrap();
/// let mut y = [0.0f32; 10];
/// model.infer(&[0.5; 64], &mut y, &mut scratch).unwrap();
/// ```
#[macro_export]
macro_rules! scratch_len {
    ($model:expr) => {
        match $crate::model::required_scratch($model) {
            Ok(n) => n,
            Err(_) => panic!("not a valid .moe model"),
        }
    };
}

/// [`scratch_len!`] for the integer path only ([`Model::infer_int`],
/// [`Resolved::infer_int`]): without room for float edges.
///
/// ```
/// const MODEL: &[u8] = micromoe::include_model!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_int8.moe"));
/// const SCRATCH: usize = micromoe::scratch_len_int!(MODEL);
/// assert!(SCRATCH < micromoe::scratch_len!(MODEL));
/// let mut scratch = [0u8; SCRATCH];
/// let model = micromoe::Model::parse(MODEL).unwrap();
/// let (x, mut y) = ([0i8; 64], [0i8; 10]);
/// model.infer_int(&x, &mut y, &mut scratch).unwrap();
/// ```
#[macro_export]
macro_rules! scratch_len_int {
    ($model:expr) => {
        match $crate::model::required_scratch_int($model) {
            Ok(n) => n,
            Err(_) => panic!("not a valid .moe model"),
        }
    };
}
