//! Reading `config.json`, safetensors checkpoints and input files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use super::files::{MAX_JSON, inside, max_alloc, read_regular};
use crate::quant::f16;

/// A host-side failure, with the file, field or tensor at fault.
#[derive(Debug)]
pub enum HostError {
    /// A file could not be read or written.
    Io(PathBuf, std::io::Error),
    /// A file is not valid JSON or safetensors.
    Parse(PathBuf, String),
    /// A `config.json` field is missing or invalid.
    Config(String),
    /// A tensor is missing, unexpected, or of the wrong shape or type.
    Tensor(String),
    /// Input data has the wrong shape.
    Input(String),
    /// The model itself was refused.
    Model(crate::Error),
    /// The device asked for (`--device cuda`) cannot run it: none, no
    /// driver, an unsupported model.
    Device(String),
    /// A buffer sized by a number read from a file is larger than the limit
    /// ([`max_alloc`](super::max_alloc)) or could not be allocated.
    Memory {
        /// What the buffer is for.
        what: String,
        /// Bytes it would take.
        bytes: u128,
        /// The limit.
        limit: u64,
    },
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            HostError::Parse(p, e) => write!(f, "{}: {e}", p.display()),
            HostError::Config(m) => write!(f, "config.json: {m}"),
            HostError::Tensor(m) => write!(f, "tensor {m}"),
            HostError::Input(m) => write!(f, "input: {m}"),
            HostError::Model(e) => write!(f, "model: {e}"),
            HostError::Device(m) => write!(f, "device: {m}"),
            HostError::Memory { what, bytes, limit } => write!(
                f,
                "{what}: needs {bytes} bytes, more than the limit of {limit} \
                 (or the allocation failed); MICROMOE_MAX_ALLOC=BYTES sets the limit"
            ),
        }
    }
}

impl std::error::Error for HostError {}

impl From<crate::Error> for HostError {
    fn from(e: crate::Error) -> Self {
        HostError::Model(e)
    }
}

pub(super) fn read_json(path: &Path) -> Result<Value, HostError> {
    let bytes = read_regular(path, MAX_JSON)?;
    serde_json::from_slice(&bytes).map_err(|e| HostError::Parse(path.to_path_buf(), e.to_string()))
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensors of one safetensors file (or only the one named `only`) as f32, with shapes.
fn load_file(path: &Path, into: &mut Tensors, only: Option<&str>) -> Result<(), HostError> {
    let bytes = read_regular(path, max_alloc())?;
    load_bytes(path, &bytes, into, only)
}

/// Tensors of safetensors `bytes` (named `path` in errors). Each tensor is
/// widened to f32 in a fallible allocation, so memory stays within a
/// small multiple of the bytes given.
fn load_bytes(path: &Path, bytes: &[u8], into: &mut Tensors, only: Option<&str>) -> Result<(), HostError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| HostError::Parse(path.to_path_buf(), e.to_string()))?;
    for (name, view) in st.tensors().into_iter().filter(|(n, _)| only.is_none_or(|o| o == n)) {
        if into.contains_key(&name) {
            return Err(HostError::Tensor(format!("{name}: stored twice (in {})", path.display())));
        }
        let data = view.data();
        // (bytes per value, little-endian bytes -> f32)
        let (width, widen): (usize, fn(&[u8]) -> f32) = match view.dtype() {
            StDtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            StDtype::F16 => (2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            StDtype::BF16 => (2, |b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            d => {
                return Err(HostError::Tensor(format!(
                    "{name}: dtype {d:?} is not supported (f32, f16, bf16)"
                )));
            }
        };
        let n = data.len() / width;
        let mut values: Vec<f32> = Vec::new();
        values.try_reserve_exact(n).map_err(|_| HostError::Memory {
            what: name.clone(),
            bytes: n as u128 * 4,
            limit: max_alloc(),
        })?;
        values.extend(data.chunks_exact(width).map(widen));
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(HostError::Tensor(format!("{name}: element {i} is not finite")));
        }
        into.insert(name, (view.shape().to_vec(), values));
    }
    Ok(())
}

/// A checkpoint directory: `config.json` and its tensors.
#[derive(Debug)]
pub struct Checkpoint {
    /// The parsed `config.json`.
    pub config: Value,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Checkpoint {
    /// Reads `dir/config.json` and `dir/model.safetensors`, or the shards
    /// that `dir/model.safetensors.index.json` lists.
    ///
    /// Only regular files are read (a FIFO or a device is refused before it
    /// is opened), each within its size limit (see [`max_alloc`]); shard
    /// names must stay inside `dir`.
    pub fn open(dir: &Path) -> Result<Self, HostError> {
        let config = read_json(&dir.join("config.json"))?;
        let mut tensors = BTreeMap::new();
        let index = dir.join("model.safetensors.index.json");
        if std::fs::symlink_metadata(&index).is_ok() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| HostError::Parse(index.clone(), "no \"weight_map\" object".into()))?;
            let mut files: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            files.sort();
            files.dedup();
            for f in files {
                load_file(&inside(dir, f)?, &mut tensors, None)?;
            }
        } else {
            load_file(&dir.join("model.safetensors"), &mut tensors, None)?;
        }
        Ok(Checkpoint { config, tensors, used: Default::default() })
    }

    /// A checkpoint from memory: `config.json`'s bytes and the bytes of its
    /// safetensors files (one, or the shards).
    pub fn from_bytes(config: &[u8], safetensors: &[&[u8]]) -> Result<Self, HostError> {
        let config: Value = serde_json::from_slice(config)
            .map_err(|e| HostError::Parse("config.json".into(), e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (i, bytes) in safetensors.iter().enumerate() {
            load_bytes(Path::new(&format!("safetensors #{i}")), bytes, &mut tensors, None)?;
        }
        Ok(Checkpoint { config, tensors, used: Default::default() })
    }

    /// How many tensors the checkpoint holds (an upper bound for every
    /// count in `config.json` that needs a tensor per item).
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Tensor `name` with the given shape, as f32.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HostError> {
        let (s, v) = self.tensors.get(name).ok_or_else(|| HostError::Tensor(format!("{name}: missing")))?;
        if s != shape {
            return Err(HostError::Tensor(format!("{name}: expected shape {shape:?}, found {s:?}")));
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(v.clone())
    }

    /// Tensor `name` if present (with the given shape).
    pub fn optional(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, HostError> {
        if self.tensors.contains_key(name) { self.tensor(name, shape).map(Some) } else { Ok(None) }
    }

    /// Fails on the first tensor no one asked for (a misspelt name).
    pub fn check_all_used(&self) -> Result<(), HostError> {
        let used = self.used.borrow();
        match self.tensors.keys().find(|k| !used.contains(*k)) {
            Some(k) => Err(HostError::Tensor(format!("{k}: not part of the model described by config.json"))),
            None => Ok(()),
        }
    }
}

/// Reads model inputs, `(samples, width)` row-major: a safetensors file with
/// an `x` tensor, or a JSON file holding one array of numbers or an array of
/// arrays.
pub fn read_inputs(path: &Path, width: usize) -> Result<Vec<f32>, HostError> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    let values = if is_json {
        let v = read_json(path)?;
        let rows: Vec<&Value> = match v.as_array() {
            Some(a) if a.iter().all(Value::is_array) => a.iter().collect(),
            Some(_) => vec![&v],
            None => return Err(HostError::Input("expected an array of numbers or of arrays".into())),
        };
        let mut out = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let row = row.as_array().map(Vec::as_slice).unwrap_or_default();
            if row.len() != width {
                return Err(HostError::Input(format!(
                    "row {r} has {} values, the model takes {width}",
                    row.len()
                )));
            }
            for x in row {
                out.push(
                    x.as_f64().ok_or_else(|| HostError::Input(format!("row {r}: {x} is not a number")))?
                        as f32,
                );
            }
        }
        out
    } else {
        let mut t = BTreeMap::new();
        load_file(path, &mut t, Some("x"))?;
        let (shape, v) = t.remove("x").ok_or_else(|| HostError::Input("no tensor \"x\"".into()))?;
        if shape.len() != 2 || shape[1] != width {
            return Err(HostError::Input(format!("\"x\" has shape {shape:?}, expected (samples, {width})")));
        }
        v
    };
    if values.is_empty() {
        return Err(HostError::Input("no samples".into()));
    }
    Ok(values)
}
