//! Where a layer finds its routed experts.
//!
//! A slice of views is the plain case. A model parsed from `.moe` bytes makes
//! each view on demand instead (slicing the bytes is cheap), so a layer with
//! 64 experts needs no RAM for 64 views, and experts could as well come from
//! slow external storage.

use crate::error::{Error, Result, What};

/// A numbered set of experts.
pub trait ExpertSource {
    /// An expert view ([`Expert`](crate::expert::Expert) or
    /// [`QExpert`](crate::expert::QExpert)).
    type Expert: Copy;

    /// Number of experts.
    fn count(&self) -> usize;

    /// Expert `i`, or why it cannot be had (past the end, or a view that
    /// does not check out). A layer never skips an expert it was routed
    /// to: this error becomes the inference's error.
    fn expert(&self, i: usize) -> Result<Self::Expert>;
}

impl<T: Copy> ExpertSource for &[T] {
    type Expert = T;

    fn count(&self) -> usize {
        self.len()
    }

    fn expert(&self, i: usize) -> Result<T> {
        self.get(i).copied().ok_or(Error::OutOfRange { what: What::Experts, index: i })
    }
}

impl<T: Copy, const N: usize> ExpertSource for &[T; N] {
    type Expert = T;

    fn count(&self) -> usize {
        N
    }

    fn expert(&self, i: usize) -> Result<T> {
        self.get(i).copied().ok_or(Error::OutOfRange { what: What::Experts, index: i })
    }
}
