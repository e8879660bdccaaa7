//! Byte layout constants and little-endian readers usable in `const fn`.

use crate::error::{Error, Field};

/// First 8 bytes of every `.moe` file.
pub const MAGIC: [u8; 8] = *b"MICROMOE";
/// The format version this build writes. It reads this one and
/// [`VERSION_CRC32`].
pub const VERSION: u16 = 2;
/// Version 1: the same layout with a CRC-32 trailer (4 bytes). Still read,
/// checked by a bitwise CRC (about 60 instructions a byte on a Cortex-M4:
/// 0.8 M for the int8 digits model); `micromoe upgrade` rewrites such a
/// file as version 2 without touching anything else.
pub const VERSION_CRC32: u16 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Bytes of one layer record.
pub const LAYER_LEN: usize = 96;
/// Bytes of one tensor table entry.
pub const ENTRY_LEN: usize = 32;
/// Alignment of the model bytes and of every tensor's data.
pub const ALIGN: usize = 16;
/// Bytes of the checksum trailer of version 2 ([`checksum`]).
pub const CHECK_LEN: usize = 8;
/// Bytes of version 1's CRC-32 trailer.
pub const CRC_LEN: usize = 4;

/// The trailer's length for a format version this build reads.
pub const fn trailer_len(version: u16) -> Option<usize> {
    match version {
        VERSION => Some(CHECK_LEN),
        VERSION_CRC32 => Some(CRC_LEN),
        _ => None,
    }
}

/// Header field offsets.
pub(crate) mod header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_LEN: usize = 10;
    pub const TOTAL_LEN: usize = 12;
    pub const ARCH: usize = 16;
    pub const TASK: usize = 20;
    pub const INPUT_DIM: usize = 24;
    pub const OUTPUT_DIM: usize = 28;
    pub const N_LAYERS: usize = 32;
    pub const N_TENSORS: usize = 36;
    pub const LAYERS_OFFSET: usize = 40;
    pub const TABLE_OFFSET: usize = 44;
    pub const DATA_OFFSET: usize = 48;
    pub const TASKS: usize = 52;
    pub const RESERVED: usize = 56;
}

/// Layer record word indices (each word is 4 bytes).
pub(crate) mod layer {
    pub const IN_DIM: usize = 0;
    pub const OUT_DIM: usize = 1;
    pub const HIDDEN: usize = 2;
    pub const EXPERTS: usize = 3;
    pub const K: usize = 4;
    pub const FLAGS: usize = 5;
    pub const ACT: usize = 6;
    pub const GATE_DTYPE: usize = 7;
    pub const EXPERT_DTYPE: usize = 8;
    pub const SHARED_HIDDEN: usize = 9;
    pub const N_GROUP: usize = 10;
    pub const TOPK_GROUP: usize = 11;
    pub const SCALING: usize = 12;
    pub const SCALING_Q15: usize = 13;
    pub const IN_SCALE: usize = 14;
    pub const IN_ZP: usize = 15;
    pub const OUT_SCALE: usize = 16;
    pub const OUT_ZP: usize = 17;
    pub const EXPERT_ZP: usize = 18;
    pub const COMBINE_MULT: usize = 19;
    pub const COMBINE_SHIFT: usize = 20;
    pub const EXPERTS_FROM: usize = 21;
    pub const RESERVED: usize = 22;
    pub const WORDS: usize = 24;
}

/// Layer flags.
pub mod flags {
    /// Renormalize the chosen weights.
    pub const NORMALIZE: u32 = 1;
    /// Sigmoid scores (else softmax).
    pub const SIGMOID: u32 = 2;
    /// Gated experts (else MLP).
    pub const GATED: u32 = 4;
    /// A shared expert.
    pub const SHARED: u32 = 8;
    /// The shared expert has a sigmoid gate.
    pub const SHARED_GATE: u32 = 16;
    /// Expert linears have biases.
    pub const BIASES: u32 = 32;
    /// The router has a selection bias.
    pub const SELECTION_BIAS: u32 = 64;
    /// Every defined flag.
    pub const ALL: u32 = 127;
}

/// Decoder (architecture 3) record: 16 words right after the header;
/// the layer records follow it.
pub mod decoder {
    /// Bytes of the decoder record.
    pub const LEN: usize = 64;
    /// Vocabulary size.
    pub const VOCAB: usize = 0;
    /// Hidden (residual stream) width.
    pub const HIDDEN: usize = 1;
    /// Attention heads.
    pub const HEADS: usize = 2;
    /// Key/value heads (grouped-query attention).
    pub const KV_HEADS: usize = 3;
    /// Width of one head.
    pub const HEAD_DIM: usize = 4;
    /// Positions the KV cache holds.
    pub const CONTEXT: usize = 5;
    /// Rotary embedding base, f32 bits.
    pub const ROPE_THETA: usize = 6;
    /// RMSNorm epsilon, f32 bits.
    pub const RMS_EPS: usize = 7;
    /// [`flags`].
    pub const FLAGS: usize = 8;
    /// First reserved word.
    pub const RESERVED: usize = 9;
    /// Words in the record.
    pub const WORDS: usize = 16;

    /// Decoder flags.
    pub mod flags {
        /// The output projection is the token embedding (tied).
        pub const TIED: u32 = 1;
        /// q, k and v projections have biases.
        pub const QKV_BIAS: u32 = 2;
        /// The KV cache holds f16 (else f32).
        pub const KV_F16: u32 = 4;
        /// Every defined flag.
        pub const ALL: u32 = 7;
    }

    /// Decoder layer record words (the rest of the 24 are reserved, zero).
    pub mod layer {
        /// Routed experts (0: a dense layer, its FFN is the shared expert).
        pub const EXPERTS: usize = 0;
        /// Experts chosen per token.
        pub const K: usize = 1;
        /// Hidden width of a routed expert.
        pub const HIDDEN: usize = 2;
        /// Hidden width of the shared expert (0: none).
        pub const SHARED_HIDDEN: usize = 3;
        /// [`flags`].
        pub const FLAGS: usize = 4;
        /// First reserved word.
        pub const RESERVED: usize = 5;

        /// Decoder layer flags.
        pub mod flags {
            /// Renormalize the chosen experts' weights (Mixtral; Qwen2-MoE `norm_topk_prob`).
            pub const NORMALIZE: u32 = 1;
            /// The shared expert has a sigmoid gate (Qwen2-MoE).
            pub const SHARED_GATE: u32 = 2;
            /// Every defined flag.
            pub const ALL: u32 = 3;
        }
    }

    /// Layer index of model-level tensors (embedding, final norm, output).
    pub const MODEL_LEVEL: u16 = 0xFFFF;

    /// Tensor roles of decoders, beyond the MoE roles 0..=4.
    pub mod role {
        /// Attention query projection `(heads * head_dim, hidden)`.
        pub const Q: u8 = 8;
        /// Key projection `(kv_heads * head_dim, hidden)`.
        pub const K: u8 = 9;
        /// Value projection `(kv_heads * head_dim, hidden)`.
        pub const V: u8 = 10;
        /// Attention output projection `(hidden, heads * head_dim)`.
        pub const O: u8 = 11;
        /// RMSNorm weight before attention `(hidden, 1)`.
        pub const ATTN_NORM: u8 = 12;
        /// RMSNorm weight before the FFN `(hidden, 1)`.
        pub const FFN_NORM: u8 = 13;
        /// Token embedding `(vocab, hidden)` (model level).
        pub const EMBED: u8 = 14;
        /// Final RMSNorm weight `(hidden, 1)` (model level).
        pub const FINAL_NORM: u8 = 15;
        /// Output projection `(vocab, hidden)` (model level, untied models).
        pub const LM_HEAD: u8 = 16;
        /// Number of roles a decoder may use.
        pub const COUNT: u8 = 17;
    }

    /// Per-row f32 scales of an int8 matrix (`(rows, 1)`): row `r` is `w[r] * scale[r]`.
    pub const SCALE_PART: u8 = 4;
}

/// Tensor entry byte offsets.
pub(crate) mod entry {
    pub const LAYER: usize = 0;
    pub const EXPERT: usize = 2;
    pub const ROLE: usize = 4;
    pub const PART: usize = 5;
    pub const DTYPE: usize = 6;
    pub const RESERVED: usize = 7;
    pub const ROWS: usize = 8;
    pub const COLS: usize = 12;
    pub const OFFSET: usize = 16;
    pub const BYTES: usize = 20;
    pub const IN_ZP: usize = 24;
    pub const OUT_ZP: usize = 28;
}

/// Expert index of the shared expert in tensor entries.
pub const SHARED_EXPERT: u16 = 0xFFFE;
/// Expert index of layer-level tensors (gate, selection bias).
pub const LAYER_LEVEL: u16 = 0xFFFF;

/// What a tensor is for.
pub mod role {
    /// Router gate `(experts, in)`.
    pub const GATE: u8 = 0;
    /// Expert `up` (`w3`).
    pub const UP: u8 = 1;
    /// Expert `gate` (`w1`) of gated units.
    pub const GATE_PROJ: u8 = 2;
    /// Expert `down` (`w2`).
    pub const DOWN: u8 = 3;
    /// The shared expert's sigmoid gate `(1, in)`.
    pub const SHARED_GATE: u8 = 4;
    /// The router's selection bias (f32 on float layers, Q15 `i32` on integer ones).
    pub const SELECTION_BIAS: u8 = 5;
    /// An expert's activation table (integer layers).
    pub const LUT: u8 = 6;
    /// An expert's product parameters `[a_zp, b_zp, out_zp, multiplier, shift]` (integer gated layers).
    pub const MUL: u8 = 7;
    /// Number of roles.
    pub const COUNT: u8 = 8;
}

/// Which array of a tensor.
pub mod part {
    /// Weights (or the tensor itself).
    pub const WEIGHT: u8 = 0;
    /// Bias.
    pub const BIAS: u8 = 1;
    /// Per-row requantization multipliers.
    pub const MULTIPLIER: u8 = 2;
    /// Per-row requantization shifts.
    pub const SHIFT: u8 = 3;
    /// Number of parts.
    pub const COUNT: u8 = 4;
}

/// Element type codes of tensor entries.
pub mod dtype {
    /// f32.
    pub const F32: u8 = 0;
    /// f16.
    pub const F16: u8 = 1;
    /// i8.
    pub const I8: u8 = 2;
    /// i16.
    pub const I16: u8 = 3;
    /// i32.
    pub const I32: u8 = 4;
    /// i64.
    pub const I64: u8 = 5;

    /// Bytes of one element, or 0 for an unknown code.
    pub const fn size(code: u8) -> usize {
        match code {
            F32 | I32 => 4,
            F16 | I16 => 2,
            I8 => 1,
            I64 => 8,
            _ => 0,
        }
    }
}

/// Numeric type of a layer's gate or experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LayerDtype {
    /// f32 weights.
    F32 = 0,
    /// f16 weights, f32 arithmetic.
    F16 = 1,
    /// int8 weights and activations.
    Int8 = 2,
    /// int8 weights, Q15 activations.
    Q15 = 3,
}

impl LayerDtype {
    /// From its code.
    pub const fn from_code(code: u32) -> Option<LayerDtype> {
        match code {
            0 => Some(LayerDtype::F32),
            1 => Some(LayerDtype::F16),
            2 => Some(LayerDtype::Int8),
            3 => Some(LayerDtype::Q15),
            _ => None,
        }
    }

    /// On the integer path.
    pub const fn is_int(self) -> bool {
        matches!(self, LayerDtype::Int8 | LayerDtype::Q15)
    }

    /// Short name: f32, f16, int8, q15.
    pub const fn name(self) -> &'static str {
        match self {
            LayerDtype::F32 => "f32",
            LayerDtype::F16 => "f16",
            LayerDtype::Int8 => "int8",
            LayerDtype::Q15 => "q15",
        }
    }
}

/// The `N` bytes at `at`, or `None` past the end (checked slicing: no
/// panic path).
const fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<&[u8; N]> {
    match b.split_at_checked(at) {
        Some((_, rest)) => rest.first_chunk::<N>(),
        None => None,
    }
}

/// `u16` at `at`, or `None` past the end.
pub const fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    match bytes_at::<2>(b, at) {
        Some(c) => Some(u16::from_le_bytes(*c)),
        None => None,
    }
}

/// `u32` at `at`, or `None` past the end.
pub const fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    match bytes_at::<4>(b, at) {
        Some(c) => Some(u32::from_le_bytes(*c)),
        None => None,
    }
}

/// Word `w` of layer record `i`, or `None` past the end.
pub(crate) const fn layer_word(b: &[u8], layers_offset: usize, i: usize, w: usize) -> Option<u32> {
    match i.checked_mul(LAYER_LEN) {
        Some(o) => match layers_offset.checked_add(o + 4 * w) {
            Some(at) => u32_at(b, at),
            None => None,
        },
        None => None,
    }
}

/// Header word as `usize`, or the error for `field`.
pub(crate) const fn header_usize(b: &[u8], at: usize, field: Field) -> Result<usize, Error> {
    match u32_at(b, at) {
        Some(v) => Ok(v as usize),
        None => Err(Error::BadField { field, layer: 0 }),
    }
}

/// CRC-32 (IEEE 802.3, as zlib and PNG), bit by bit: version 1's trailer.
/// No table (1 KB of flash saved for a format only old files use).
pub fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |mut c, &b| {
        c ^= b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
        }
        c
    })
}

/// Multiplier of the checksum's second lane (odd, so that a step is a
/// bijection of the lane; the 32-bit golden ratio).
const CHECK_MUL: u32 = 0x9E37_79B1;

/// Version 2's trailer: two 32-bit lanes over the little-endian words `w`
/// of the payload (its length is a multiple of 16 in any file this crate
/// writes; a shorter last word counts as zero-padded), returned as `(a, b)`
/// and stored as lane `a` then lane `b` ([`seal`]):
///
/// ```text
/// a <- rotl(a, 5) + w        b <- b * 0x9E3779B1 + a      (mod 2^32)
/// ```
///
/// from `a = 0x4D4F4531` and `b = payload length`. Each step is a
/// bijection of `a` for the other words fixed, so any change confined to
/// one word is always detected. Lane `b` weighs every intermediate `a`:
/// where two changes cancel in `a` (a rotate-add chain over zero words is a
/// pure rotation with period 32), the `a`s between them differ in rotated,
/// low, bits that `b`'s multiply carries upward. Feeding `b` the words
/// directly instead left it blind to bit 31 (its changes are `2^31 * odd`)
/// and missed a pair of bit-31 flips 32 words apart within a few thousand
/// trials; `tests/format.rs` runs flips, bursts, word swaps and erased
/// blocks over a real model. Two ALU instructions a word on a Cortex-M
/// (`add a, w, a, ror #27` and `mla`) against CRC-32's 14 with a 1 KB
/// table: the digits model's parse on the Cortex-M4 went from 74k to under
/// 30k instructions.
pub fn checksum(bytes: &[u8]) -> (u32, u32) {
    let mut a: u32 = 0x4D4F_4531;
    let mut b: u32 = bytes.len() as u32;
    let mut step = |w: u32| {
        a = a.rotate_left(5).wrapping_add(w);
        b = b.wrapping_mul(CHECK_MUL).wrapping_add(a);
    };
    // Four words a turn, written out (at opt-level "s" LLVM keeps an inner
    // loop rolled: 5 instructions of overhead a word; eight words a turn
    // run out of registers on a Cortex-M).
    let (blocks, rest) = bytes.as_chunks::<16>();
    for block in blocks {
        let (w, _) = block.as_chunks::<4>();
        if let [w0, w1, w2, w3] = w {
            step(u32::from_le_bytes(*w0));
            step(u32::from_le_bytes(*w1));
            step(u32::from_le_bytes(*w2));
            step(u32::from_le_bytes(*w3));
        }
    }
    let (words, tail) = rest.as_chunks::<4>();
    for w in words {
        step(u32::from_le_bytes(*w));
    }
    if !tail.is_empty() {
        let mut last = [0u8; 4];
        last[..tail.len()].copy_from_slice(tail);
        step(u32::from_le_bytes(last));
    }
    (a, b)
}

/// Writes the trailer of `bytes` (a whole container, trailer included) for
/// the version its header names; `false` if the version is not one this
/// build reads or the bytes are shorter than a trailer. For tools and
/// tests that edit a container and keep it valid.
pub fn seal(bytes: &mut [u8]) -> bool {
    let Some(n) =
        u16_at(bytes, header::VERSION).and_then(trailer_len).and_then(|t| bytes.len().checked_sub(t))
    else {
        return false;
    };
    let (payload, trailer) = bytes.split_at_mut(n);
    if trailer.len() == CHECK_LEN {
        let (a, b) = checksum(payload);
        trailer[..4].copy_from_slice(&a.to_le_bytes());
        trailer[4..].copy_from_slice(&b.to_le_bytes());
    } else {
        trailer.copy_from_slice(&crc32(payload).to_le_bytes());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn checksum_pads_the_last_word_and_counts_the_length() {
        let data: [u8; 37] = core::array::from_fn(|i| (i as u8).wrapping_mul(73).wrapping_add(11));
        // Every length against the definition written out word by word.
        for n in 0..=data.len() {
            let (mut a, mut b) = (0x4D4F_4531u32, n as u32);
            for w in data[..n].chunks(4) {
                let mut p = [0u8; 4];
                p[..w.len()].copy_from_slice(w);
                let w = u32::from_le_bytes(p);
                a = a.rotate_left(5).wrapping_add(w);
                b = b.wrapping_mul(0x9E37_79B1).wrapping_add(a);
            }
            assert_eq!(checksum(&data[..n]), (a, b), "{n} bytes");
        }
        // A trailing zero byte is not the same payload.
        assert_ne!(checksum(&[1, 2, 3]), checksum(&[1, 2, 3, 0]));
    }
}
