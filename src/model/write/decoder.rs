//! Writing decoder models (architecture 3).

use alloc::vec::Vec;

use crate::error::{Error, Field, Result};
use crate::format::Key;
use crate::format::arch;
use crate::format::layout::decoder::{self as dl, SCALE_PART};
use crate::format::layout::{LayerDtype, layer as lw, part};
use crate::format::write::{AlignedBytes, Entry, Head, assemble, entry};
use crate::model::{Config, LayerConfig};
use crate::quant::f16;

/// A whole decoder to write: the decoder record, the layer records (the
/// very types [`Decoder::parse`](crate::model::Decoder::parse) reads back), tensors.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    /// Hyper-parameters (`config.layers` must equal `layers.len()`).
    pub config: Config,
    /// One record per layer.
    pub layers: Vec<LayerConfig>,
    /// Columns per int8 scale (see [`DecoderSpec::with_int8_group`]).
    int8_group: Option<usize>,
    entries: Vec<Entry>,
}

impl DecoderSpec {
    /// A decoder with no tensors yet.
    pub fn new(config: Config, layers: Vec<LayerConfig>) -> Self {
        DecoderSpec { config, layers, int8_group: None, entries: Vec::new() }
    }

    /// int8 matrices put from now on get one scale per `group` columns
    /// (a multiple of [`INT8_GROUP_MULTIPLE`](crate::model::INT8_GROUP_MULTIPLE)
    /// that divides every int8 matrix's columns: [`DecoderSpec::write`]
    /// refuses the model otherwise) instead of one per row; `None` goes
    /// back to one per row.
    pub fn with_int8_group(mut self, group: Option<usize>) -> Self {
        self.int8_group = group;
        self
    }

    /// Adds a `(rows, cols)` tensor at `key` from f32 `values`, stored as
    /// `dtype`: f32, f16, or int8 (symmetric per row, or per group of
    /// columns after [`DecoderSpec::with_int8_group`], with a `(rows,
    /// groups)` scale tensor; `Q15` is not a decoder storage type and
    /// stores int8).
    pub fn put(&mut self, key: Key, rows: usize, cols: usize, values: &[f32], dtype: LayerDtype) {
        match dtype {
            LayerDtype::F32 => self.entries.push(entry(key, rows, cols, values, (0, 0))),
            LayerDtype::F16 => {
                let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                self.entries.push(entry(key, rows, cols, &h, (0, 0)));
            }
            LayerDtype::Int8 | LayerDtype::Q15 => {
                // Rows are contiguous and groups divide them: a group is
                // quantized as a row of its own.
                let group = self.int8_group.unwrap_or(cols).max(1);
                let (q, scales) = quantize_rows(values, group);
                self.entries.push(entry(key, rows, cols, &q, (0, 0)));
                let per_row = scales.len() / rows.max(1);
                self.entries.push(entry(Key { part: SCALE_PART, ..key }, rows, per_row, &scales, (0, 0)));
            }
        }
    }

    /// Adds an f32 bias `(rows, 1)` for the matrix at `key`.
    pub fn put_bias(&mut self, key: Key, values: &[f32]) {
        self.entries.push(entry(Key { part: part::BIAS, ..key }, values.len(), 1, values, (0, 0)));
    }

    /// Serializes the decoder (validated by parsing the result).
    pub fn write(self) -> Result<Vec<u8>> {
        let bad = |field| Error::BadField { field, layer: 0 };
        let n = self.layers.len();
        if n == 0 || n > crate::format::MAX_LAYERS || n != self.config.layers {
            return Err(bad(Field::Layers));
        }
        let c = &self.config;
        let u = |v: usize| u32::try_from(v).map_err(|_| bad(Field::Dims));
        let mut d = [0u32; dl::WORDS];
        d[dl::VOCAB] = u(c.vocab)?;
        d[dl::HIDDEN] = u(c.hidden)?;
        d[dl::HEADS] = u(c.heads)?;
        d[dl::KV_HEADS] = u(c.kv_heads)?;
        d[dl::HEAD_DIM] = u(c.head_dim)?;
        d[dl::CONTEXT] = u(c.context)?;
        d[dl::ROPE_THETA] = c.rope_theta.to_bits();
        d[dl::RMS_EPS] = c.rms_eps.to_bits();
        d[dl::FLAGS] =
            [(c.tied, dl::flags::TIED), (c.qkv_bias, dl::flags::QKV_BIAS), (c.kv_f16, dl::flags::KV_F16)]
                .iter()
                .filter(|(on, _)| *on)
                .fold(0, |f, (_, bit)| f | bit);
        let mut records = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut w = [0u32; lw::WORDS];
            w[dl::layer::EXPERTS] = u(l.experts)?;
            w[dl::layer::K] = u(l.k)?;
            w[dl::layer::HIDDEN] = u(l.hidden)?;
            w[dl::layer::SHARED_HIDDEN] = u(l.shared_hidden)?;
            w[dl::layer::FLAGS] = if l.normalize { dl::layer::flags::NORMALIZE } else { 0 }
                | if l.shared_gate { dl::layer::flags::SHARED_GATE } else { 0 };
            records.push(w);
        }
        let vocab = u(c.vocab)?;
        let head = Head { arch: arch::DECODER, tasks: 1, task: 0, input_dim: vocab, output_dim: vocab };
        let bytes = assemble(&head, &d, &records, self.entries)?;
        // What was written must read back.
        crate::model::Decoder::parse(&AlignedBytes::from(&bytes[..]))?;
        Ok(bytes)
    }
}

/// Symmetric int8 per row: `scale = max |row| / 127` (1 for an all-zero
/// row), `q = round(w / scale)`, half away from zero.
pub fn quantize_rows(values: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / cols);
    for row in values.chunks(cols) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        q.extend(row.iter().map(|&v| libm::roundf(v / scale).clamp(-127.0, 127.0) as i8));
        scales.push(scale);
    }
    (q, scales)
}
