//! The tensor table: entries sorted by `(layer, expert, role, part)`, found
//! by binary search, handed out as typed zero-copy slices.

use core::marker::PhantomData;

use super::layout::{ENTRY_LEN, dtype, entry, u16_at};
use crate::error::{Error, Result};
use crate::quant::f16;

/// An element type a tensor can hold.
pub trait Elem: bytemuck::Pod {
    /// Its dtype code.
    const DTYPE: u8;
}

impl Elem for f32 {
    const DTYPE: u8 = dtype::F32;
}
impl Elem for f16 {
    const DTYPE: u8 = dtype::F16;
}
impl Elem for i8 {
    const DTYPE: u8 = dtype::I8;
}
impl Elem for i16 {
    const DTYPE: u8 = dtype::I16;
}
impl Elem for i32 {
    const DTYPE: u8 = dtype::I32;
}
impl Elem for i64 {
    const DTYPE: u8 = dtype::I64;
}

/// Where a tensor belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// Layer index.
    pub layer: u16,
    /// Expert index, or `SHARED_EXPERT` / `LAYER_LEVEL`.
    pub expert: u16,
    /// Role code.
    pub role: u8,
    /// Part code.
    pub part: u8,
}

impl Key {
    fn missing(self) -> Error {
        Error::MissingTensor { layer: self.layer, expert: self.expert, role: self.role, part: self.part }
    }
}

/// One validated tensor: its place, shape, type, data and zero points.
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    /// Where it belongs.
    pub key: Key,
    /// Element type code.
    pub dtype: u8,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Zero point of the layer input (quantized linears).
    pub in_zp: i32,
    /// Zero point of the layer output (quantized linears).
    pub out_zp: i32,
    /// Raw little-endian data, 16-aligned.
    pub data: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// The data as `T`, if the dtype is `T`'s.
    pub fn slice<T: Elem>(&self) -> Option<&'a [T]> {
        if self.dtype != T::DTYPE {
            return None;
        }
        bytemuck::try_cast_slice(self.data).ok()
    }
}

/// The validated tensor table of a model.
#[derive(Debug, Clone, Copy)]
pub struct Table<'a> {
    bytes: &'a [u8],
    table_offset: usize,
    n: usize,
}

impl<'a> Table<'a> {
    /// Wraps a table whose entries `parse` has validated.
    pub(crate) fn new(bytes: &'a [u8], table_offset: usize, n: usize) -> Self {
        Table { bytes, table_offset, n }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True without entries.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Entry `i`; `None` past the end.
    pub fn get(&self, i: usize) -> Option<Tensor<'a>> {
        let e = self.entry(i)?;
        let word = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
        let (offset, len) = (word(entry::OFFSET) as usize, word(entry::BYTES) as usize);
        Some(Tensor {
            key: key_of(e),
            dtype: e[entry::DTYPE],
            rows: word(entry::ROWS) as usize,
            cols: word(entry::COLS) as usize,
            in_zp: word(entry::IN_ZP) as i32,
            out_zp: word(entry::OUT_ZP) as i32,
            data: self.bytes.get(offset..offset.checked_add(len)?)?,
        })
    }

    /// The 32 bytes of entry `i`: one bounds check, then fixed offsets.
    fn entry(&self, i: usize) -> Option<&'a [u8; ENTRY_LEN]> {
        if i >= self.n {
            return None;
        }
        let at = self.table_offset + i * ENTRY_LEN;
        self.bytes.get(at..at + ENTRY_LEN)?.try_into().ok()
    }

    /// The tensor at `key`, if present.
    pub fn find(&self, key: Key) -> Option<Tensor<'a>> {
        // A binary search that stops at the key (the decoder looks up its
        // tensors per token: this is not `lower_bound` and a compare).
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match key_of(self.entry(mid)?).cmp(&key) {
                core::cmp::Ordering::Less => lo = mid + 1,
                core::cmp::Ordering::Greater => hi = mid,
                core::cmp::Ordering::Equal => return self.get(mid),
            }
        }
        None
    }

    /// Index of the first entry whose key is `key` or greater (`len()` if
    /// none): entries are sorted, so this is a binary search.
    pub fn lower_bound(&self, key: Key) -> usize {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.key(mid) {
                Some(k) if k < key => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo
    }

    /// The block of entries from `start` whose key is `(layer, expert, ..)`:
    /// for each `(role, part)` its offset from `start` at slot
    /// `role * PARTS + part` of `N` (`u8::MAX` where absent), and the
    /// block's length (at most `N` entries are read: keys are distinct and
    /// sorted, so a block whose codes fit the slots is no longer).
    pub(crate) fn scan_block<const N: usize, const PARTS: usize>(
        &self,
        start: usize,
        layer: u16,
        expert: u16,
    ) -> ([u8; N], usize) {
        let mut at = [u8::MAX; N];
        let id = layer as u32 | (expert as u32) << 16;
        let mut n = 0usize;
        for e in self.entries_from(start).iter().take(N.min(u8::MAX as usize)) {
            // Bytes 0..4 of an entry: layer, expert (u16 each); then role, part.
            if u32::from_le_bytes([e[0], e[1], e[2], e[3]]) != id {
                break;
            }
            if let Some(slot) = at.get_mut(PARTS * e[entry::ROLE] as usize + e[entry::PART] as usize) {
                *slot = n as u8;
            }
            n += 1;
        }
        (at, n)
    }

    /// The entries from `start` to the end (empty past it), 32 bytes each.
    pub(crate) fn entries_from(&self, start: usize) -> &'a [[u8; ENTRY_LEN]] {
        let from = start.min(self.n).saturating_mul(ENTRY_LEN).saturating_add(self.table_offset);
        let to = self.n.saturating_mul(ENTRY_LEN).saturating_add(self.table_offset);
        self.bytes.get(from..to).map_or(&[], |b| b.as_chunks::<ENTRY_LEN>().0)
    }

    /// Entry `i`'s key; `None` past the end.
    pub fn key(&self, i: usize) -> Option<Key> {
        self.entry(i).map(key_of)
    }

    #[cfg_attr(
        not(any(feature = "f32", feature = "f16", feature = "int8", feature = "q15")),
        allow(dead_code)
    )]
    /// Entry `i`'s data as `T`, found by position, without looking at its
    /// dtype or shape: for entries [`Model::parse`](crate::Model::parse)
    /// has checked to be `T` of the right shape (the resolved views of a
    /// parsed model). `None` past the end or if the bytes are not `T`s.
    pub(crate) fn data<T: Elem>(&self, i: usize) -> Option<&'a [T]> {
        let e = self.entry(i)?;
        let word = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]) as usize;
        let (offset, len) = (word(entry::OFFSET), word(entry::BYTES));
        bytemuck::try_cast_slice(self.bytes.get(offset..offset.checked_add(len)?)?).ok()
    }

    #[cfg_attr(
        not(any(feature = "f32", feature = "f16", feature = "int8", feature = "q15")),
        allow(dead_code)
    )]
    /// Entry `i`'s input and output zero points (0 past the end).
    pub(crate) fn zero_points(&self, i: usize) -> (i32, i32) {
        let Some(e) = self.entry(i) else { return (0, 0) };
        let word = |o: usize| i32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
        (word(entry::IN_ZP), word(entry::OUT_ZP))
    }

    #[cfg_attr(
        not(any(feature = "f32", feature = "f16", feature = "int8", feature = "q15")),
        allow(dead_code)
    )]
    /// Entry `i`'s dtype code, rows and columns.
    pub(crate) fn shape(&self, i: usize) -> Option<(u8, u32, u32)> {
        let e = self.entry(i)?;
        let word = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
        Some((e[entry::DTYPE], word(entry::ROWS), word(entry::COLS)))
    }

    /// The tensor at `key` as a `(rows, cols)` array of `T`, or
    /// [`Error::MissingTensor`] naming it.
    pub fn need<T: Elem>(&self, key: Key, rows: usize, cols: usize) -> Result<Typed<'a, T>> {
        Self::typed(self.find(key), key, rows, cols)
    }

    /// [`Table::need`]'s checks of a tensor found some other way (the
    /// decoder finds its tensors by position).
    pub(crate) fn typed<T: Elem>(
        t: Option<Tensor<'a>>,
        key: Key,
        rows: usize,
        cols: usize,
    ) -> Result<Typed<'a, T>> {
        let t = t.ok_or(key.missing())?;
        let data = t.slice::<T>().ok_or(key.missing())?;
        if t.rows != rows || t.cols != cols {
            return Err(key.missing());
        }
        Ok(Typed { data, in_zp: t.in_zp, out_zp: t.out_zp, _t: PhantomData })
    }

    /// Like [`Table::need`], `None` if the tensor is absent (an error if
    /// present but malformed).
    pub fn optional<T: Elem>(&self, key: Key, rows: usize, cols: usize) -> Result<Option<&'a [T]>> {
        match self.find(key) {
            None => Ok(None),
            Some(_) => self.need(key, rows, cols).map(|t| Some(t.data)),
        }
    }
}

/// A tensor's data as `T`, with its zero points.
#[derive(Debug, Clone, Copy)]
pub struct Typed<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// Input zero point.
    pub in_zp: i32,
    /// Output zero point.
    pub out_zp: i32,
    _t: PhantomData<T>,
}

fn key_of(e: &[u8; ENTRY_LEN]) -> Key {
    Key {
        layer: u16::from_le_bytes([e[entry::LAYER], e[entry::LAYER + 1]]),
        expert: u16::from_le_bytes([e[entry::EXPERT], e[entry::EXPERT + 1]]),
        role: e[entry::ROLE],
        part: e[entry::PART],
    }
}

pub(crate) fn key_at(b: &[u8], at: usize) -> Option<Key> {
    Some(Key {
        layer: u16_at(b, at + entry::LAYER)?,
        expert: u16_at(b, at + entry::EXPERT)?,
        role: *b.get(at + entry::ROLE)?,
        part: *b.get(at + entry::PART)?,
    })
}
