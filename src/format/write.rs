//! Writing `.moe` bytes (`alloc`): the container's layout from a header,
//! records and tensors ([`assemble`]), and an aligned heap buffer to parse
//! them from. The graphs' writers, which turn layers into records and
//! tensors, are [`model::write`](crate::model::write)'s.

use alloc::vec;
use alloc::vec::Vec;

use super::layout::{
    ALIGN, CHECK_LEN, ENTRY_LEN, HEADER_LEN, LAYER_LEN, MAGIC, VERSION, VERSION_CRC32, entry, header,
    layer as lw, seal,
};
use super::table::{Elem, Key};
use crate::error::{Error, Field, Result};

/// One tensor to write: its key, type code, shape, zero points and bytes.
#[derive(Debug, Clone)]
pub struct Entry {
    key: Key,
    dtype: u8,
    rows: usize,
    cols: usize,
    in_zp: i32,
    out_zp: i32,
    data: Vec<u8>,
}

/// The tensor `key` of `rows x cols` elements `data` (row-major) with
/// input and output zero points `zps`.
pub fn entry<T: Elem>(key: Key, rows: usize, cols: usize, data: &[T], zps: (i32, i32)) -> Entry {
    Entry {
        key,
        dtype: T::DTYPE,
        rows,
        cols,
        in_zp: zps.0,
        out_zp: zps.1,
        data: bytemuck::cast_slice(data).to_vec(),
    }
}

pub(crate) fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Header fields that differ between models.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    /// Architecture code ([`arch`](super::arch)).
    pub arch: u32,
    /// Tasks (chains of layers).
    pub tasks: usize,
    /// 0 classify, 1 regress.
    pub task: u32,
    /// Input width.
    pub input_dim: u32,
    /// Output width.
    pub output_dim: u32,
}

/// Lays out header, `prelude` words (the decoder record), layer records,
/// the sorted table and the data, and appends the checksum. What the records
/// and tensors mean is not checked here: the graphs' writers
/// ([`model::write`](crate::model::write)) parse what they wrote.
pub fn assemble(
    head: &Head,
    prelude: &[u32],
    records: &[[u32; lw::WORDS]],
    mut entries: Vec<Entry>,
) -> Result<Vec<u8>> {
    let n_layers = records.len();
    entries.sort_by_key(|e| e.key);
    let layers_offset = HEADER_LEN + 4 * prelude.len();
    let table_offset = layers_offset + n_layers * LAYER_LEN;
    let data_offset = align(table_offset + entries.len() * ENTRY_LEN);
    let mut offsets = Vec::with_capacity(entries.len());
    let mut end = data_offset;
    for e in &entries {
        offsets.push(end);
        end = align(end + e.data.len());
    }
    let total = end + CHECK_LEN;
    let too_big = |_| Error::BadField { field: Field::Offsets, layer: 0 };
    let total_u32 = u32::try_from(total).map_err(too_big)?;
    let mut b = vec![0u8; total];
    b[..8].copy_from_slice(&MAGIC);
    b[header::VERSION..header::VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    b[header::HEADER_LEN..header::HEADER_LEN + 2].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    put_u32(&mut b, header::TOTAL_LEN, total_u32);
    put_u32(&mut b, header::ARCH, head.arch);
    put_u32(&mut b, header::TASKS, head.tasks as u32);
    put_u32(&mut b, header::TASK, head.task);
    put_u32(&mut b, header::INPUT_DIM, head.input_dim);
    put_u32(&mut b, header::OUTPUT_DIM, head.output_dim);
    put_u32(&mut b, header::N_LAYERS, n_layers as u32);
    put_u32(&mut b, header::N_TENSORS, entries.len() as u32);
    put_u32(&mut b, header::LAYERS_OFFSET, layers_offset as u32);
    put_u32(&mut b, header::TABLE_OFFSET, table_offset as u32);
    put_u32(&mut b, header::DATA_OFFSET, data_offset as u32);
    for (i, &v) in prelude.iter().enumerate() {
        put_u32(&mut b, HEADER_LEN + 4 * i, v);
    }
    for (l, words) in records.iter().enumerate() {
        for (i, &v) in words.iter().enumerate() {
            put_u32(&mut b, layers_offset + l * LAYER_LEN + 4 * i, v);
        }
    }
    for (i, (e, &offset)) in entries.iter().zip(&offsets).enumerate() {
        let at = table_offset + i * ENTRY_LEN;
        b[at + entry::LAYER..at + entry::LAYER + 2].copy_from_slice(&e.key.layer.to_le_bytes());
        b[at + entry::EXPERT..at + entry::EXPERT + 2].copy_from_slice(&e.key.expert.to_le_bytes());
        b[at + entry::ROLE] = e.key.role;
        b[at + entry::PART] = e.key.part;
        b[at + entry::DTYPE] = e.dtype;
        put_u32(&mut b, at + entry::ROWS, e.rows as u32);
        put_u32(&mut b, at + entry::COLS, e.cols as u32);
        put_u32(&mut b, at + entry::OFFSET, offset as u32);
        put_u32(&mut b, at + entry::BYTES, e.data.len() as u32);
        put_u32(&mut b, at + entry::IN_ZP, e.in_zp as u32);
        put_u32(&mut b, at + entry::OUT_ZP, e.out_zp as u32);
        b[offset..offset + e.data.len()].copy_from_slice(&e.data);
    }
    seal(&mut b);
    Ok(b)
}

/// A version 1 container (CRC-32 trailer) rewritten as version 2: the
/// same header, records, table and data, byte for byte, with the version,
/// the total length and the trailer changed. The CRC is checked first (a
/// corrupted file is refused, not resealed); a version 2 file comes back
/// as it is.
pub fn upgrade(bytes: &[u8]) -> Result<Vec<u8>> {
    let h = super::Header::parse(bytes)?;
    if super::layout::u16_at(bytes, header::VERSION) != Some(VERSION_CRC32) {
        return Ok(bytes.to_vec());
    }
    let total = h.payload + CHECK_LEN;
    let total_u32 = u32::try_from(total).map_err(|_| Error::BadField { field: Field::Offsets, layer: 0 })?;
    let mut b = vec![0u8; total];
    b[..h.payload].copy_from_slice(&bytes[..h.payload]);
    b[header::VERSION..header::VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    put_u32(&mut b, header::TOTAL_LEN, total_u32);
    seal(&mut b);
    Ok(b)
}

/// Bytes on the heap starting at a 16-byte aligned address, for
/// [`Model::parse`](crate::Model::parse) of a file read at run time.
#[derive(Debug, Clone)]
pub struct AlignedBytes {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl From<&[u8]> for AlignedBytes {
    fn from(bytes: &[u8]) -> Self {
        let mut a = AlignedBytes::within(vec![0u8; bytes.len() + ALIGN - 1], bytes.len());
        a.copy_from_slice(bytes);
        a
    }
}

impl AlignedBytes {
    /// `len` zero bytes, aligned; `None` when they cannot be allocated
    /// (the allocation is fallible: a size read from a file cannot abort).
    pub fn try_zeroed(len: usize) -> Option<Self> {
        let total = len.checked_add(ALIGN - 1)?;
        // Asked for fallibly, then taken as zeroed pages (`vec!` is calloc).
        let mut probe: Vec<u8> = Vec::new();
        probe.try_reserve_exact(total).ok()?;
        drop(probe);
        Some(AlignedBytes::within(vec![0u8; total], len))
    }

    /// The first `len` bytes of `buf` from its first 16-byte aligned address
    /// (`buf` holds `len + ALIGN - 1` bytes).
    fn within(buf: Vec<u8>, len: usize) -> Self {
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN - 1);
        AlignedBytes { buf, start, len }
    }
}

impl core::ops::DerefMut for AlignedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl core::ops::Deref for AlignedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}
