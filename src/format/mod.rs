//! The `.moe` model container: versioned, little-endian, parsed zero-copy
//! from `&[u8]` (flash, a file, or a heap buffer) and validated in full
//! before use.
//!
//! # Byte layout (version 2)
//!
//! All integers little-endian. The buffer must start 16-byte aligned
//! ([`include_model!`](crate::include_model) does that for flash).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `MICROMOE` |
//! | 8 | 2 | version (2; 1 is read too, see the trailer) |
//! | 10 | 2 | header bytes (64) |
//! | 12 | 4 | total length in bytes, trailer included |
//! | 16 | 4 | architecture: 1 = stack of MoE layers (classifier / regressor); 2 = multi-gate MoE (one chain of layers per task, see below); 3 = decoder language model (see the end) |
//! | 20 | 4 | task: 0 = classify (argmax of the output), 1 = regress |
//! | 24 | 4 | input width |
//! | 28 | 4 | output width |
//! | 32 | 4 | number of layers L (1..=64) |
//! | 36 | 4 | number of tensors T |
//! | 40 | 4 | offset of the layer records (64) |
//! | 44 | 4 | offset of the tensor table (64 + 96 L) |
//! | 48 | 4 | offset of the data section (16-aligned, after the table) |
//! | 52 | 4 | tasks T: 1 for a stack; for multi-gate MoE the layers form T chains of L / T layers, each taking the model input, and the output is the chains' outputs one after the other |
//! | 56 | 8 | reserved, zero |
//!
//! **Layer record** (96 bytes, 24 little-endian words; layer i's input width
//! is layer i-1's output width, the first takes the model input, the last
//! gives the model output):
//!
//! | word | field |
//! |---|---|
//! | 0, 1, 2 | input width, output width, expert hidden width |
//! | 3, 4 | experts, k |
//! | 5 | flags: 1 normalize, 2 sigmoid scores, 4 gated experts, 8 shared expert, 16 shared expert gate, 32 expert biases, 64 selection bias |
//! | 6 | activation: 0 ReLU, 1 GELU, 2 GELU (tanh), 3 SiLU |
//! | 7, 8 | gate and expert numeric type: 0 f32, 1 f16, 2 int8, 3 Q15 (an integer gate routes experts of its own type; a float gate routes any, integer experts over the dequantized input) |
//! | 9 | shared expert hidden width |
//! | 10, 11 | expert groups, groups kept (0 = no groups) |
//! | 12 | routed scaling factor (f32 bits); 13: the same in Q15 (integer layers) |
//! | 14, 15 | input scale (f32 bits), input zero point (integer layers) |
//! | 16, 17 | output scale, output zero point |
//! | 18, 19, 20 | combine: expert output zero point, multiplier, shift |
//! | 21 | the layer whose routed experts this layer uses: itself, or an earlier layer with the same expert shapes and type (multi-gate MoE: every task's gate routes over one expert pool) |
//! | 22..24 | reserved, zero |
//!
//! **Tensor table**: T entries of 32 bytes, sorted strictly ascending by
//! `(layer, expert, role, part)`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | layer |
//! | 2 | 2 | expert (`0xFFFE` shared expert, `0xFFFF` layer-level) |
//! | 4 | 1 | role: 0 gate, 1 up (`w3`), 2 gate_proj (`w1`), 3 down (`w2`), 4 shared expert gate, 5 selection bias, 6 activation table, 7 product parameters |
//! | 5 | 1 | part: 0 weight, 1 bias, 2 multipliers, 3 shifts |
//! | 6 | 1 | dtype: 0 f32, 1 f16, 2 i8, 3 i16, 4 i32, 5 i64 |
//! | 7 | 1 | reserved, zero |
//! | 8, 12 | 4, 4 | rows, columns (`(out, in)` for weights, `(n, 1)` for vectors) |
//! | 16, 20 | 4, 4 | data offset (16-aligned) and length in bytes (= rows x columns x element size) |
//! | 24, 28 | 4, 4 | input and output zero point (quantized weights) |
//!
//! Integer linears store int8 weights (symmetric per row), a bias (`i32`
//! for int8, `i64` for Q15), and per-row multipliers and shifts (`i32`).
//!
//! **Trailer** (8 bytes): the [`checksum`](layout::checksum) of every byte
//! before it, lane `a` then lane `b`, each a little-endian `u32`. Version 1
//! files (otherwise identical) end in a 4-byte CRC-32 (IEEE) instead; they
//! parse, at about 20x the boot cost, and `micromoe upgrade` rewrites them.
//!
//! # Decoders (architecture 3)
//!
//! Run by [`model::Decoder`](crate::model::Decoder). Header: task 0,
//! input and output width = vocabulary, tasks 1, layer records at offset
//! 128: a **decoder record** of 16 words sits between header and records:
//!
//! | word | field |
//! |---|---|
//! | 0, 1 | vocabulary, hidden width |
//! | 2, 3, 4 | attention heads, key/value heads (divides heads), head width (even) |
//! | 5 | context: positions the KV cache holds |
//! | 6, 7 | RoPE base, RMSNorm epsilon (f32 bits) |
//! | 8 | flags: 1 tied output projection, 2 q/k/v biases, 4 f16 KV cache |
//! | 9..16 | reserved, zero |
//!
//! **Decoder layer record** (96 bytes): word 0 routed experts (0: a dense
//! layer), 1 k, 2 expert hidden width, 3 shared expert hidden width (0:
//! none; a dense layer's FFN is its shared expert), 4 flags (1 renormalize
//! the chosen weights, 2 sigmoid gate on the shared expert); the rest zero.
//!
//! **Tensors**: layer-level roles 8..=13 (q, k, v, o projections; the two
//! RMSNorm weights), the router gate (role 0) and shared expert gate (4);
//! experts and the shared expert use roles 1..=3 (up, gate_proj, down) as
//! above; model-level tensors (layer `0xFFFF`) are the embedding (14), the
//! final norm (15) and, untied, the output projection (16). Matrices are
//! f32, f16 or int8; int8 ones have part 4, an f32 scale per row. Norms
//! and biases are f32.
//!
//! ```
//! # #[cfg(feature = "alloc")] {
//! use micromoe::Model;
//! use micromoe::model::write::{LayerSpec, ModelSpec, Task};
//! use micromoe::kernels::Activation;
//! use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
//! use micromoe::format::LayerDtype;
//! use micromoe::Rule;
//! let lin = |v: f32, rows, cols| LinearBuf::new(vec![v; rows * cols], None, rows, cols);
//! let experts = vec![
//!     ExpertBuf::mlp(lin(0.5, 4, 2), lin(0.25, 3, 4), Activation::Relu),
//!     ExpertBuf::mlp(lin(-0.5, 4, 2), lin(0.25, 3, 4), Activation::Relu),
//! ];
//! let layer = MoeBuf::new(LinearBuf::new(vec![1.0, 1.0, -1.0, -1.0], None, 2, 2), experts, Rule::switch(2));
//! let spec = ModelSpec::stack(Task::Classify, vec![LayerSpec::Float { layer, gate: LayerDtype::F32, experts: LayerDtype::F16 }]);
//! let bytes = micromoe::model::write::write(&spec).unwrap();
//! let bytes = micromoe::format::write::AlignedBytes::from(&bytes[..]);
//! let model = Model::parse(&bytes).unwrap();
//! let mut scratch = vec![0u8; model.scratch_bytes()];
//! let mut y = [0.0f32; 3];
//! model.infer(&[1.0, 1.0], &mut y, &mut scratch).unwrap();
//! # }
//! ```

pub mod layout;
mod table;
#[cfg(feature = "alloc")]
pub mod write;

pub use layout::{ALIGN, LayerDtype, MAGIC, VERSION};
pub use table::{Elem, Key, Table, Tensor, Typed};

use layout::{CRC_LEN, ENTRY_LEN, HEADER_LEN, LAYER_LEN, header, header_usize};

use crate::error::{Error, Field, Result, TensorProblem};

/// Most layers a model may have.
pub const MAX_LAYERS: usize = 64;
/// Largest width of any layer.
pub const MAX_DIM: usize = 1 << 20;

/// Model architectures.
pub mod arch {
    /// A stack of MoE layers.
    pub const MOE_STACK: u32 = 1;
    /// Multi-gate MoE (Ma et al., 2018): one gate and one tower per task over
    /// a shared pool of experts, stored as one chain of layers per task.
    pub const MULTI_GATE: u32 = 2;
    /// A decoder language model (Mixtral / Qwen2-MoE style), run by
    /// [`model::Decoder`](crate::model::Decoder).
    pub const DECODER: u32 = 3;
}

/// A container's header, checked: length, magic, version, checksum, alignment,
/// offsets and codes. What the records and tensors mean is the graphs'
/// business ([`crate::model`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Architecture code ([`arch`]).
    pub arch: u32,
    /// 0 classify, 1 regress.
    pub task: u32,
    /// Layer records.
    pub n_layers: usize,
    /// Tensor table entries.
    pub n_tensors: usize,
    /// Offset of the tensor table.
    pub table_offset: usize,
    /// Offset of the data section.
    pub data_offset: usize,
    /// Bytes before the checksum trailer.
    pub payload: usize,
    /// Input width.
    pub input_dim: usize,
    /// Output width.
    pub output_dim: usize,
    /// Tasks (chains of layers).
    pub tasks: usize,
}

impl Header {
    /// Checks the header of `bytes` and the checksum over them.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        if bytes.len() < HEADER_LEN + CRC_LEN {
            return Err(Error::Truncated { needed: HEADER_LEN + CRC_LEN, actual: bytes.len() });
        }
        if bytes[header::MAGIC..header::MAGIC + 8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = layout::u16_at(bytes, header::VERSION).unwrap_or(0);
        let Some(trailer) = layout::trailer_len(version) else {
            return Err(Error::Version { found: version });
        };
        let h = |at, field| header_usize(bytes, at, field);
        let total = h(header::TOTAL_LEN, Field::Offsets)?;
        if total > bytes.len() {
            return Err(Error::Truncated { needed: total, actual: bytes.len() });
        }
        if total < HEADER_LEN + trailer || total != bytes.len() {
            return Err(Error::BadField { field: Field::Offsets, layer: 0 });
        }
        let payload = total - trailer;
        let lane = |at| layout::u32_at(bytes, at).unwrap_or(0);
        let (stored, computed) = if version == VERSION {
            ((lane(payload), lane(payload + 4)), layout::checksum(&bytes[..payload]))
        } else {
            ((lane(payload), 0), (layout::crc32(&bytes[..payload]), 0))
        };
        if stored != computed {
            let (lane, stored, computed) =
                if stored.0 != computed.0 { (0, stored.0, computed.0) } else { (1, stored.1, computed.1) };
            return Err(Error::Checksum { lane, stored, computed });
        }
        let misaligned = bytes.as_ptr() as usize % ALIGN;
        if misaligned != 0 {
            return Err(Error::Misaligned { offset: misaligned });
        }
        if layout::u16_at(bytes, header::HEADER_LEN) != Some(HEADER_LEN as u16) {
            return Err(Error::BadField { field: Field::HeaderLen, layer: 0 });
        }
        let arch = h(header::ARCH, Field::Arch)? as u32;
        if !matches!(arch, arch::MOE_STACK | arch::MULTI_GATE | arch::DECODER) {
            return Err(Error::BadField { field: Field::Arch, layer: 0 });
        }
        let task = h(header::TASK, Field::Task)? as u32;
        if task > 1 {
            return Err(Error::BadField { field: Field::Task, layer: 0 });
        }
        if bytes[header::RESERVED..HEADER_LEN].iter().any(|&b| b != 0) {
            return Err(Error::BadField { field: Field::Reserved, layer: 0 });
        }
        let n_layers = h(header::N_LAYERS, Field::Layers)?;
        if !(1..=MAX_LAYERS).contains(&n_layers) {
            return Err(Error::BadField { field: Field::Layers, layer: 0 });
        }
        let n_tensors = h(header::N_TENSORS, Field::Tensors)?;
        let layers_offset =
            if arch == arch::DECODER { HEADER_LEN + layout::decoder::LEN } else { HEADER_LEN };
        let table_offset = layers_offset + n_layers * LAYER_LEN;
        let table_end = n_tensors.checked_mul(ENTRY_LEN).and_then(|t| t.checked_add(table_offset));
        let data_offset = h(header::DATA_OFFSET, Field::Offsets)?;
        let offsets_ok = h(header::LAYERS_OFFSET, Field::Offsets)? == layers_offset
            && h(header::TABLE_OFFSET, Field::Offsets)? == table_offset
            && table_end.is_some_and(|end| end <= data_offset)
            && data_offset % ALIGN == 0
            && data_offset <= payload;
        if !offsets_ok {
            return Err(Error::BadField { field: Field::Offsets, layer: 0 });
        }
        let input_dim = h(header::INPUT_DIM, Field::Dims)?;
        let output_dim = h(header::OUTPUT_DIM, Field::Dims)?;

        let tasks = h(header::TASKS, Field::Tasks)?;
        let tasks_ok = match arch {
            arch::MOE_STACK | arch::DECODER => tasks == 1,
            _ => tasks >= 1 && n_layers.is_multiple_of(tasks),
        };
        if !tasks_ok {
            return Err(Error::BadField { field: Field::Tasks, layer: 0 });
        }
        Ok(Header {
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
        })
    }
}

/// Checks every table entry: `allowed(key)` for its codes and indices, then
/// order, alignment, bounds and size.
pub(crate) fn check_entries(
    bytes: &[u8],
    (table_offset, n, data_offset, payload): (usize, usize, usize, usize),
    mut allowed: impl FnMut(Key) -> Result<bool>,
) -> Result<()> {
    use layout::{dtype, entry};
    let mut prev: Option<Key> = None;
    for index in 0..n {
        let bad = |problem| Error::BadTensor { index, problem };
        let at = table_offset + index * ENTRY_LEN;
        let key = table::key_at(bytes, at).ok_or(bad(TensorProblem::Bounds))?;
        let byte = |i| bytes.get(at + i).copied().ok_or(bad(TensorProblem::Bounds));
        let code = byte(entry::DTYPE)?;
        if !allowed(key)? || dtype::size(code) == 0 || byte(entry::RESERVED)? != 0 {
            return Err(bad(TensorProblem::Code));
        }
        if prev.is_some_and(|p| p >= key) {
            return Err(bad(TensorProblem::Order));
        }
        prev = Some(key);
        let u = |o| layout::u32_at(bytes, at + o).map(|v| v as usize).ok_or(bad(TensorProblem::Bounds));
        let (rows, cols, offset, len) =
            (u(entry::ROWS)?, u(entry::COLS)?, u(entry::OFFSET)?, u(entry::BYTES)?);
        if offset % ALIGN != 0 || offset < data_offset {
            return Err(bad(TensorProblem::Alignment));
        }
        if offset.checked_add(len).is_none_or(|end| end > payload) {
            return Err(bad(TensorProblem::Bounds));
        }
        let size = rows.checked_mul(cols).and_then(|rc| rc.checked_mul(dtype::size(code)));
        if size != Some(len) {
            return Err(bad(TensorProblem::Size));
        }
    }
    Ok(())
}

/// Places a `.moe` file in the binary (flash) 16-byte aligned, as
/// [`Model::parse`](crate::Model::parse) needs; evaluates to `&'static [u8]`, usable in `const`.
///
/// ```
/// // Firmware writes a path relative to the source file: include_model!("../models/digits_int8.moe").
/// const MODEL: &[u8] = micromoe::include_model!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_int8.moe"));
/// assert_eq!(MODEL.as_ptr() as usize % 16, 0);
/// assert!(micromoe::Model::parse(MODEL).is_ok());
/// ```
#[macro_export]
macro_rules! include_model {
    ($path:expr) => {{
        #[repr(C, align(16))]
        struct Aligned<T: ?Sized>(T);
        const ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!($path));
        &ALIGNED.0
    }};
}
