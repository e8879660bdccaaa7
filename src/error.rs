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
            What::ZeroPoint => "zero point",
            What::Experts => "number of experts",
            What::TopK => "top-k",
            What::Groups => "expert groups",
            What::Calibration => "calibration data",
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
