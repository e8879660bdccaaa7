//! Activation memory carved from one caller-provided byte buffer.
//!
//! Layers never allocate: they ask for `scratch_bytes()` and take a
//! `&mut [u8]` of at least that size, which firmware declares as a `static`
//! or on the stack. [`Carve`] splits it into typed, aligned slices without
//! `unsafe` (via `bytemuck`), so the buffer itself needs no alignment.
//!
//! ```
//! use micromoe::scratch::{Carve, bytes_for};
//! let need = bytes_for::<f32>(3) + bytes_for::<i8>(5);
//! let mut buf = vec![0u8; need];
//! let mut c = Carve::new(&mut buf);
//! let a: &mut [f32] = c.take(3).unwrap();
//! a[0] = 1.0;
//! let b: &mut [i8] = c.take(5).unwrap();
//! b[4] = -1;
//! ```

use crate::error::{Error, Result};

/// Bytes that [`Carve::take`] needs for `n` values of `T`, including the
/// worst-case padding to `T`'s alignment.
pub const fn bytes_for<T>(n: usize) -> usize {
    n.saturating_mul(core::mem::size_of::<T>()).saturating_add(core::mem::align_of::<T>() - 1)
}

/// Hands out consecutive typed slices of a byte buffer.
pub struct Carve<'a> {
    rest: &'a mut [u8],
    total: usize,
}

impl<'a> Carve<'a> {
    /// Starts carving `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        let total = buf.len();
        Carve { rest: buf, total }
    }

    /// Everything not yet taken.
    pub fn rest(self) -> &'a mut [u8] {
        self.rest
    }

    /// The next `n` values of `T`, aligned; [`Error::ScratchTooSmall`] if the
    /// buffer is exhausted.
    pub fn take<T: bytemuck::Pod>(&mut self, n: usize) -> Result<&'a mut [T]> {
        let rest = core::mem::take(&mut self.rest);
        let pad = rest.as_ptr().align_offset(core::mem::align_of::<T>());
        let len = n.checked_mul(core::mem::size_of::<T>()).ok_or(Error::Overflow)?;
        let too_small = Error::ScratchTooSmall {
            needed: self.total - rest.len() + pad.saturating_add(len),
            actual: self.total,
        };
        let end = pad.checked_add(len).ok_or(Error::Overflow)?;
        if end > rest.len() {
            return Err(too_small);
        }
        let (head, tail) = rest.split_at_mut(end);
        self.rest = tail;
        bytemuck::try_cast_slice_mut(&mut head[pad..]).map_err(|_| too_small)
    }
}
