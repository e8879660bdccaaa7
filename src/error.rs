//! The crate's one error type.
//!
//! Every way an input can be wrong has its own variant, and each variant says
//! *what* was wrong (a name from [`What`]) and the numbers involved, so a
//! firmware log line is enough to find the fault.

use core::fmt;

/// Names the buffer, tensor or parameter an [`Error`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum What {
    /// The input activation vector.
    Input,
    /// The output activation vector.
    Output,
    /// A weight matrix.
    Weight,
    /// A bias vector.
    Bias,
    /// Per-channel requantization multipliers or shifts.
    Requant,
    /// An activation look-up table.
    Lut,
    /// Router logits.
    Logits,
    /// The router's selection bias.
    SelectionBias,
    /// The router's scaling factor.
    Scaling,
    /// A quantization scale.
    Scale,
    /// A zero point.
    ZeroPoint,
    /// The number of experts.
    Experts,
    /// The number of experts chosen per token (k).
    TopK,
    /// Expert groups of group-limited routing.
    Groups,
    /// Calibration data.
    Calibration,
    /// A token id.
    Token,
    /// Sampling temperature.
    Temperature,
    /// Sampling top-p.
    TopP,
    /// A work or state buffer.
    Scratch,
    /// A hidden state inside a model (overflowed to infinity or NaN: the
    /// weights or inputs are out of float range).
    Hidden,
    /// A layer index.
    Layer,
    /// The columns one int8 scale covers: the whole row, or a group that
    /// is a multiple of [`INT8_GROUP_MULTIPLE`](crate::model::INT8_GROUP_MULTIPLE)
    /// and divides the row.
    ScaleGroup,
}

/// A field of a `.moe` header or layer record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Field {
    /// Header size.
    HeaderLen,
    /// Architecture code.
    Arch,
    /// Task code.
    Task,
    /// Model input or output width, or a layer width that does not chain.
    Dims,
    /// Layer count.
    Layers,
    /// Task count (multi-gate MoE).
    Tasks,
    /// Tensor count.
    Tensors,
    /// A section offset.
    Offsets,
    /// Reserved bytes that must be zero.
    Reserved,
    /// Experts, k, groups or routing flags.
    Routing,
    /// Activation code.
    Activation,
    /// Numeric type code.
    Dtype,
    /// Scaling factor or quantization parameters.
    Quant,
}

/// What is wrong with a `.moe` tensor table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum TensorProblem {
    /// Unknown dtype, role or part code, or layer / expert out of range.
    Code,
    /// Entries are not in strictly ascending key order.
    Order,
    /// Data offset not 16-aligned, or before the data section.
    Alignment,
    /// Data extends past the payload.
    Bounds,
    /// Byte length differs from rows x cols x element size.
    Size,
    /// A routed expert's entries are not expert 0's roles and parts in the
    /// same order (every expert of a layer has the same tensors).
    Pattern,
}

/// Everything that can go wrong in micromoe. Never a panic instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// A slice does not have the length its shape requires.
    Shape {
        /// Which slice.
        what: What,
        /// Length the shape requires.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// Two parts that must agree in a dimension do not (e.g. an expert's
    /// input width and the router's).
    DimMismatch {
        /// Which part disagrees.
        what: What,
        /// The dimension the rest of the layer uses.
        expected: usize,
        /// The part's dimension.
        actual: usize,
    },
    /// A size computation overflowed `usize`.
    Overflow,
    /// The caller's scratch buffer is too small; `needed` bytes are required.
    ScratchTooSmall {
        /// Bytes needed, as returned by the layer's `scratch_bytes`.
        needed: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A float input holds NaN or infinity at `index`.
    NonFinite {
        /// Which input.
        what: What,
        /// Index of the first non-finite element.
        index: usize,
    },
    /// A parameter is outside the range micromoe supports.
    OutOfRange {
        /// Which parameter.
        what: What,
        /// Index of the offending element (0 for scalars).
        index: usize,
    },
    /// k is 0, above [`MAX_K`](crate::router::MAX_K) or above the number of
    /// (eligible) experts.
    TopK {
        /// k asked for.
        k: usize,
        /// Number of experts it must be chosen from.
        experts: usize,
    },
    /// Group-limited routing is inconsistent (experts not divisible into
    /// groups, too many groups, or too few experts in the chosen groups).
    Groups {
        /// Number of groups.
        groups: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Number of experts.
        experts: usize,
    },
    /// Not a `.moe` model: the magic bytes are wrong.
    BadMagic,
    /// A `.moe` format version this build cannot read.
    Version {
        /// Version in the file.
        found: u16,
    },
    /// The buffer is shorter than the model (or its header) needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The trailer's checksum over header and payload does not match:
    /// corrupted bytes. Version 2's [`checksum`](crate::format::layout::checksum)
    /// has two 32-bit lanes: the first that differs is reported (`lane` 0
    /// or 1); version 1's CRC-32 is lane 0. (32-bit fields keep `Error`,
    /// and every `Result` on the inference path, small.)
    Checksum {
        /// Which lane.
        lane: u8,
        /// The lane stored in the file.
        stored: u32,
        /// The lane computed over the bytes given.
        computed: u32,
    },
    /// Model bytes must start at a 16-byte aligned address for zero-copy
    /// views (use `include_model!` or an aligned buffer).
    Misaligned {
        /// Start address modulo 16.
        offset: usize,
    },
    /// A header or layer record field is invalid.
    BadField {
        /// Which field.
        field: Field,
        /// Layer index (0 for header fields).
        layer: usize,
    },
    /// A tensor table entry is invalid.
    BadTensor {
        /// Entry index.
        index: usize,
        /// What is wrong.
        problem: TensorProblem,
    },
    /// A tensor a layer needs is missing or has the wrong shape or type.
    MissingTensor {
        /// Layer index.
        layer: u16,
        /// Expert index (`0xFFFE` shared, `0xFFFF` layer-level).
        expert: u16,
        /// Role code (see `format`).
        role: u8,
        /// Part code (see `format`).
        part: u8,
    },
    /// The decoder's KV cache is full: it holds `context` positions.
    ContextFull {
        /// Positions the cache holds (fixed at conversion).
        context: usize,
    },
    /// A decoder state used with another decoder than the one that made it.
    WrongState,
    /// [`Model::infer_int`](crate::Model::infer_int) cannot run layer
    /// `layer`: its experts are of another type, or it takes another
    /// quantization than the previous layer gives.
    IntegerPath {
        /// The layer.
        layer: usize,
    },
    /// The model needs a part of the crate this build leaves out: the cargo
    /// feature `feature` (`f32`, `f16`, `int8`, `q15`, `decoder`, `mmoe` or `shared`).
    Disabled {
        /// The feature to enable.
        feature: &'static str,
    },
    /// The model is not of the architecture this parse or call takes: a
    /// decoder given to [`Model::parse`](crate::Model::parse), a stack to
    /// [`Decoder::parse`](crate::model::Decoder::parse), a regressor to
    /// [`Model::classify`](crate::Model::classify).
    WrongArchitecture {
        /// Architecture code of the model.
        found: u32,
    },
    /// The model has more layers than a [`Resolved`](crate::model::Resolved)
    /// holds.
    TooManyLayers {
        /// Layers in the model.
        layers: usize,
        /// Layers the `Resolved` has room for.
        capacity: usize,
    },
    /// The statistics buffer has room for fewer experts than the layer has.
    StatsTooSmall {
        /// Experts in the layer.
        experts: usize,
        /// Capacity of the `Stats`.
        capacity: usize,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T> = core::result::Result<T, Error>;

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            What::Input => "input",
            What::Output => "output",
            What::Weight => "weight",
            What::Bias => "bias",
            What::Requant => "requantization parameters",
            What::Lut => "activation look-up table",
            What::Logits => "router logits",
            What::SelectionBias => "selection bias",
            What::Scaling => "routed scaling factor",
            What::Scale => "quantization scale",
            What::ScaleGroup => "int8 scale group (the whole row, or a multiple of 16 columns dividing it)",
            What::ZeroPoint => "zero point",
            What::Experts => "number of experts",
            What::TopK => "top-k",
            What::Groups => "expert groups",
            What::Calibration => "calibration data",
            What::Token => "token id",
            What::Temperature => "temperature",
            What::TopP => "top-p",
            What::Scratch => "work buffer",
            What::Hidden => "hidden state",
            What::Layer => "layer index",
        };
        f.write_str(s)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Shape { what, expected, actual } => {
                write!(f, "{what}: expected {expected} elements, got {actual}")
            }
            Error::DimMismatch { what, expected, actual } => {
                write!(f, "{what}: dimension {actual} does not match the layer's {expected}")
            }
            Error::Overflow => f.write_str("size computation overflowed"),
            Error::ScratchTooSmall { needed, actual } => {
                write!(f, "scratch buffer too small: need {needed} bytes, got {actual}")
            }
            Error::NonFinite { what, index } => {
                write!(f, "{what}: NaN or infinity at index {index}")
            }
            Error::OutOfRange { what, index } => {
                write!(f, "{what}: value at index {index} is out of the supported range")
            }
            Error::TopK { k, experts } => {
                write!(f, "top-k: cannot choose {k} of {experts} experts (1 <= k <= min(8, experts))")
            }
            Error::Groups { groups, topk_group, experts } => write!(
                f,
                "expert groups: {experts} experts in {groups} groups keeping {topk_group} is inconsistent"
            ),
            Error::BadMagic => f.write_str("not a .moe model (bad magic bytes)"),
            Error::Version { found } => write!(f, "unsupported .moe version {found}"),
            Error::Truncated { needed, actual } => {
                write!(f, "model truncated: need {needed} bytes, got {actual}")
            }
            Error::Checksum { lane, stored, computed } => {
                write!(
                    f,
                    "model corrupted: checksum lane {lane} is {computed:#010x}, the file says {stored:#010x}"
                )
            }
            Error::Misaligned { offset } => {
                write!(f, "model bytes start {offset} bytes past a 16-byte boundary; zero-copy needs 16")
            }
            Error::BadField { field, layer } => write!(f, "invalid {field:?} field (layer {layer})"),
            Error::BadTensor { index, problem } => write!(f, "tensor {index}: {problem:?}"),
            Error::MissingTensor { layer, expert, role, part } => write!(
                f,
                "missing or malformed tensor: layer {layer}, expert {expert}, role {role}, part {part}"
            ),
            Error::ContextFull { context } => {
                write!(f, "context full: the KV cache holds {context} positions (set at conversion)")
            }
            Error::WrongState => f.write_str("this decoder state was made for another decoder"),
            Error::IntegerPath { layer } => write!(
                f,
                "layer {layer} cannot run on the integer path (another type, or its input quantization is not the previous layer's output)"
            ),
            Error::Disabled { feature } => {
                write!(f, "the model needs micromoe's `{feature}` cargo feature, which this build leaves out")
            }
            Error::WrongArchitecture { found } => {
                write!(
                    f,
                    "this parse or call does not take models of architecture {found} (decoders are Decoder::parse's, stacks and multi-gate models Model::parse's)"
                )
            }
            Error::TooManyLayers { layers, capacity } => {
                write!(f, "the model has {layers} layers, the Resolved holds {capacity}")
            }
            Error::StatsTooSmall { experts, capacity } => {
                write!(f, "stats hold {capacity} experts, the layer has {experts}")
            }
        }
    }
}

impl core::error::Error for Error {}

/// Checks that `actual == expected`, naming `what` otherwise.
pub(crate) fn check_len(what: What, expected: usize, actual: usize) -> Result<()> {
    if expected == actual { Ok(()) } else { Err(Error::Shape { what, expected, actual }) }
}

/// Checks that a part's dimension `actual` agrees with the layer's `expected`.
pub(crate) fn check_dim(what: What, expected: usize, actual: usize) -> Result<()> {
    if expected == actual { Ok(()) } else { Err(Error::DimMismatch { what, expected, actual }) }
}

/// `a * b` or [`Error::Overflow`].
pub(crate) fn mul(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::Overflow)
}

/// Index of the first non-finite element of `xs`, as an error.
pub(crate) fn check_finite(what: What, xs: &[f32]) -> Result<()> {
    match xs.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { what, index }),
        None => Ok(()),
    }
}
