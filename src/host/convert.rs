//! Checkpoint directory -> `.moe` bytes.

use std::path::Path;

use serde_json::Value;

use super::checkpoint::{Checkpoint, HostError, read_inputs, read_json};
use super::decoder::DecoderOptions;
use crate::build::QMoeBuf;
use crate::build::{ExpertBuf, LinearBuf, MoeBuf};
use crate::format::LayerDtype;
use crate::kernels::{Activation, IntKernel};
use crate::model::write::{LayerSpec, ModelSpec, Task, write};
use crate::moe::MoeLayer;
use crate::router::Rule;

/// Numeric type to convert to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// f32 weights.
    F32,
    /// f16 weights.
    F16,
    /// int8 weights and activations (needs calibration inputs).
    Int8,
    /// int8 weights, Q15 activations (needs calibration inputs).
    Q15,
}

impl Dtype {
    /// From `f32`, `f16`, `int8`, `q15`.
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            "int8" => Dtype::Int8,
            "q15" => Dtype::Q15,
            _ => return None,
        })
    }
}

pub(super) struct Cfg<'a> {
    pub(super) v: &'a Value,
    pub(super) at: String,
}

impl Cfg<'_> {
    pub(super) fn field(&self, key: &str) -> Option<&Value> {
        self.v.get(key)
    }

    pub(super) fn usize(&self, key: &str) -> Result<usize, HostError> {
        self.field(key)
            .and_then(Value::as_u64)
            .filter(|&n| n > 0 && n <= u32::MAX as u64)
            .map(|n| n as usize)
            .ok_or_else(|| HostError::Config(format!("{}{key}: expected a positive integer", self.at)))
    }

    pub(super) fn usize_or(&self, key: &str, default: usize) -> Result<usize, HostError> {
        if self.field(key).is_none() { Ok(default) } else { self.usize(key) }
    }

    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool, HostError> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| HostError::Config(format!("{}{key}: expected true or false", self.at))),
        }
    }

    pub(super) fn str(&self, key: &str) -> Result<&str, HostError> {
        self.field(key)
            .and_then(Value::as_str)
            .ok_or_else(|| HostError::Config(format!("{}{key}: expected a string", self.at)))
    }
}

fn activation(c: &Cfg<'_>) -> Result<Activation, HostError> {
    Ok(match c.str("activation")? {
        "relu" => Activation::Relu,
        "gelu" => Activation::Gelu,
        "gelu_tanh" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "silu" | "swish" => Activation::Silu,
        a => {
            return Err(HostError::Config(format!(
                "{}activation: unknown {a:?} (relu, gelu, gelu_tanh, silu)",
                c.at
            )));
        }
    })
}

fn linear(
    ck: &Checkpoint,
    name: &str,
    rows: usize,
    cols: usize,
    bias: bool,
) -> Result<LinearBuf<f32>, HostError> {
    let w = ck.tensor(&format!("{name}.weight"), &[rows, cols])?;
    let b = if bias { Some(ck.tensor(&format!("{name}.bias"), &[rows])?) } else { None };
    Ok(LinearBuf::new(w, b, rows, cols))
}

fn expert(
    ck: &Checkpoint,
    name: &str,
    dims: (usize, usize, usize),
    gated: bool,
    bias: bool,
    act: Activation,
) -> Result<ExpertBuf<f32>, HostError> {
    let (inp, hidden, out) = dims;
    let up = linear(ck, &format!("{name}.up"), hidden, inp, bias)?;
    let down = linear(ck, &format!("{name}.down"), out, hidden, bias)?;
    if gated {
        Ok(ExpertBuf::gated(linear(ck, &format!("{name}.gate_proj"), hidden, inp, bias)?, up, down, act))
    } else {
        Ok(ExpertBuf::mlp(up, down, act))
    }
}

fn layer(ck: &Checkpoint, l: usize, v: &Value) -> Result<MoeBuf<f32>, HostError> {
    let c = Cfg { v, at: format!("layers[{l}].") };
    let (inp, out, hidden) = (c.usize("in_dim")?, c.usize("out_dim")?, c.usize("hidden")?);
    let (experts, k) = (c.usize("experts")?, c.usize("k")?);
    let act = activation(&c)?;
    let (gated, bias) = (c.bool_or("gated", false)?, c.bool_or("bias", false)?);
    let mut scaling = 1.0;
    let rule = match c.str("router")? {
        "switch" if k == 1 => Rule::switch(experts),
        "switch" => return Err(HostError::Config(format!("{}k: switch routing is top-1", c.at))),
        "mixtral" => Rule::mixtral(experts, k),
        "qwen2_moe" => Rule::qwen2_moe(experts, k, c.bool_or("norm_topk_prob", false)?),
        "deepseek_v3" => {
            scaling = match c.field("routed_scaling_factor") {
                None => 1.0,
                Some(v) => v.as_f64().ok_or_else(|| {
                    HostError::Config(format!("{}routed_scaling_factor: expected a number", c.at))
                })? as f32,
            };
            let (groups, keep) = (c.usize_or("n_group", 1)?, c.usize_or("topk_group", 1)?);
            Rule::deepseek_v3(experts, k, groups, keep, c.bool_or("norm_topk_prob", true)?)
        }
        r => {
            return Err(HostError::Config(format!(
                "{}router: unknown {r:?} (switch, mixtral, qwen2_moe, deepseek_v3)",
                c.at
            )));
        }
    };
    rule.validate().map_err(|e| HostError::Config(format!("{}: {e}", c.at.trim_end_matches('.'))))?;
    let p = format!("layers.{l}");
    let gate = linear(ck, &format!("{p}.gate"), experts, inp, false)?;
    let experts_buf = (0..experts)
        .map(|e| expert(ck, &format!("{p}.experts.{e}"), (inp, hidden, out), gated, bias, act))
        .collect::<Result<Vec<_>, _>>()?;
    let mut m = MoeBuf::new(gate, experts_buf, rule);
    m.scaling = scaling;
    m.bias = ck.optional(&format!("{p}.gate.e_score_correction_bias"), &[experts])?;
    let shared_hidden = if c.field("shared_hidden").is_some_and(|v| v.as_u64() == Some(0)) {
        0
    } else {
        c.usize_or("shared_hidden", 0)?
    };
    if shared_hidden > 0 {
        let s = expert(ck, &format!("{p}.shared_expert"), (inp, shared_hidden, out), gated, bias, act)?;
        let g = if c.bool_or("shared_gate", false)? {
            Some(linear(ck, &format!("{p}.shared_expert_gate"), 1, inp, false)?)
        } else {
            None
        };
        m.shared = Some((s, g));
    }
    Ok(m)
}

/// The layers of a checkpoint: one chain for a stack, one per task for
/// multi-gate MoE, and for every layer the layer whose experts it uses.
struct Plan {
    task: Task,
    input_dim: usize,
    chains: Vec<Vec<MoeBuf<f32>>>,
    multi_gate: bool,
}

fn task_of(root: &Cfg<'_>) -> Result<Task, HostError> {
    match root.str("task")? {
        "classify" => Ok(Task::Classify),
        "regress" => Ok(Task::Regress),
        t => Err(HostError::Config(format!("task: unknown {t:?} (classify, regress)"))),
    }
}

fn stack(ck: &Checkpoint, root: &Cfg<'_>) -> Result<Plan, HostError> {
    let layers_v = ck
        .config
        .get("layers")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| HostError::Config("layers: expected a non-empty array".into()))?;
    let input_dim = root.usize("input_dim")?;
    let mut chain = Vec::new();
    let mut width = input_dim;
    for (l, v) in layers_v.iter().enumerate() {
        let m = layer(ck, l, v)?;
        if m.gate.cols != width {
            return Err(HostError::Config(format!(
                "layers[{l}].in_dim: {}, but the input to this layer is {width} wide",
                m.gate.cols
            )));
        }
        width = m.experts[0].down.rows;
        chain.push(m);
    }
    Ok(Plan { task: task_of(root)?, input_dim, chains: vec![chain], multi_gate: false })
}

/// Multi-gate MoE: `experts` (the shared pool) and `tasks`, each with a
/// gate over the pool and a tower; a tower becomes a one-expert layer.
fn multi_gate(ck: &Checkpoint, root: &Cfg<'_>) -> Result<Plan, HostError> {
    let input_dim = root.usize("input_dim")?;
    let pool_v = ck.config.get("experts").ok_or_else(|| HostError::Config("experts: missing".into()))?;
    let pool = Cfg { v: pool_v, at: "experts.".into() };
    let (n, hidden, width) = (pool.usize("count")?, pool.usize("hidden")?, pool.usize("out_dim")?);
    let (act, gated, bias) =
        (activation(&pool)?, pool.bool_or("gated", false)?, pool.bool_or("bias", false)?);
    let experts = (0..n)
        .map(|e| expert(ck, &format!("experts.{e}"), (input_dim, hidden, width), gated, bias, act))
        .collect::<Result<Vec<_>, _>>()?;
    let tasks_v = ck
        .config
        .get("tasks")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| HostError::Config("tasks: expected a non-empty array".into()))?;
    // Every task's first layer holds its own copy of the pool.
    let pool_bytes: u128 = experts.iter().map(|e| e.bytes() as u128).sum();
    if pool_bytes * tasks_v.len() as u128 > super::files::max_alloc() as u128 {
        return Err(HostError::Memory {
            what: format!("{} tasks over an expert pool of {pool_bytes} bytes", tasks_v.len()),
            bytes: pool_bytes * tasks_v.len() as u128,
            limit: super::files::max_alloc(),
        });
    }
    let mut chains = Vec::new();
    for (t, v) in tasks_v.iter().enumerate() {
        let c = Cfg { v, at: format!("tasks[{t}].") };
        let k = c.usize_or("k", n)?;
        let rule = match c.field("router").and_then(Value::as_str).unwrap_or("qwen2_moe") {
            "qwen2_moe" => Rule::qwen2_moe(n, k, c.bool_or("norm_topk_prob", false)?),
            "mixtral" => Rule::mixtral(n, k),
            "switch" if k == 1 => Rule::switch(n),
            r => {
                return Err(HostError::Config(format!("{}router: {r:?} (qwen2_moe, mixtral, switch)", c.at)));
            }
        };
        rule.validate().map_err(|e| HostError::Config(format!("tasks[{t}]: {e}")))?;
        let gate = linear(ck, &format!("tasks.{t}.gate"), n, input_dim, false)?;
        let tower_v = v.get("tower").ok_or_else(|| HostError::Config(format!("{}tower: missing", c.at)))?;
        let tc = Cfg { v: tower_v, at: format!("tasks[{t}].tower.") };
        let (th, out) = (tc.usize("hidden")?, tc.usize("out_dim")?);
        let tower = expert(
            ck,
            &format!("tasks.{t}.tower"),
            (width, th, out),
            false,
            tc.bool_or("bias", false)?,
            activation(&tc)?,
        )?;
        // A one-expert layer: softmax over one logit is exactly 1.
        let tower_layer =
            MoeBuf::new(LinearBuf::new(vec![0.0; width], None, 1, width), vec![tower], Rule::switch(1));
        chains.push(vec![MoeBuf::new(gate, experts.clone(), rule), tower_layer]);
    }
    Ok(Plan { task: task_of(root)?, input_dim, chains, multi_gate: true })
}

/// `--gate-dtype f32|f16` with an integer `--dtype`: a float router over
/// integer experts.
fn float_gate<A: IntKernel>(
    q: QMoeBuf<A>,
    layer: &MoeLayer<'_, f32, f32>,
    gate: Option<Dtype>,
) -> QMoeBuf<A> {
    match gate {
        Some(Dtype::F32) => q.with_float_gate(layer, false),
        Some(Dtype::F16) => q.with_float_gate(layer, true),
        _ => q,
    }
}

/// True when `dir/config.json` names a Hugging Face architecture
/// (`"architectures": [...]`), i.e. a decoder checkpoint.
pub fn is_decoder_checkpoint(dir: &Path) -> Result<bool, HostError> {
    Ok(read_json(&dir.join("config.json"))?.get("architectures").is_some())
}

fn architecture(ck: &Checkpoint) -> Result<Option<&str>, HostError> {
    let Some(archs) = ck.config.get("architectures") else { return Ok(None) };
    archs
        .as_array()
        .filter(|a| a.len() == 1)
        .and_then(|a| a[0].as_str())
        .map(Some)
        .ok_or_else(|| HostError::Config("architectures: expected one architecture name".into()))
}

/// Converts a Hugging Face decoder checkpoint (`MixtralForCausalLM`,
/// `Qwen2MoeForCausalLM`) in `dir` with `opts` (context length, KV cache type).
pub fn convert_decoder(dir: &Path, opts: &DecoderOptions) -> Result<Vec<u8>, HostError> {
    convert_decoder_checkpoint(&Checkpoint::open(dir)?, opts)
}

/// [`convert_decoder`] of a checkpoint already read (e.g. by
/// [`Checkpoint::from_bytes`]).
pub fn convert_decoder_checkpoint(ck: &Checkpoint, opts: &DecoderOptions) -> Result<Vec<u8>, HostError> {
    let arch = architecture(ck)?
        .ok_or_else(|| HostError::Config("architectures: expected one architecture name".into()))?;
    super::decoder::convert_decoder(ck, arch, opts)
}

/// Converts the checkpoint in `dir` to `.moe` bytes of `dtype` (the gate in
/// `gate_dtype`, e.g. an f32 router over f16 or int8 experts). Integer types
/// need `calibration`: representative inputs (see [`read_inputs`]), from
/// which activation ranges are measured.
pub fn convert(
    dir: &Path,
    dtype: Dtype,
    gate_dtype: Option<Dtype>,
    calibration: Option<&Path>,
) -> Result<Vec<u8>, HostError> {
    convert_with_progress(dir, dtype, gate_dtype, calibration, |_, _| {})
}

/// [`convert`], calling `progress(done, total)` as layers are converted.
pub fn convert_with_progress(
    dir: &Path,
    dtype: Dtype,
    gate_dtype: Option<Dtype>,
    calibration: Option<&Path>,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<u8>, HostError> {
    let ck = Checkpoint::open(dir)?;
    let arch = architecture(&ck)?;
    let calibration = match calibration {
        Some(_) if arch.is_some() => {
            return Err(HostError::Input(
                "decoders need no --calibration (int8 quantizes activations per product)".into(),
            ));
        }
        Some(p) => {
            let width = Cfg { v: &ck.config, at: String::new() }.usize("input_dim")?;
            Some(read_inputs(p, width)?)
        }
        None => None,
    };
    convert_checkpoint(&ck, dtype, gate_dtype, calibration.as_deref(), progress)
}

/// [`convert_with_progress`] of a checkpoint already read, with the
/// calibration inputs as values `(samples, input_dim)`.
pub fn convert_checkpoint(
    ck: &Checkpoint,
    dtype: Dtype,
    gate_dtype: Option<Dtype>,
    calibration: Option<&[f32]>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<u8>, HostError> {
    if let Some(arch) = architecture(ck)? {
        if calibration.is_some() {
            return Err(HostError::Input(
                "decoders need no --calibration (int8 quantizes activations per product)".into(),
            ));
        }
        let opts = DecoderOptions { dtype, gate_dtype, ..DecoderOptions::new(dtype) };
        progress(0, 1);
        let bytes = super::decoder::convert_decoder(ck, arch, &opts)?;
        progress(1, 1);
        return Ok(bytes);
    }
    let root = Cfg { v: &ck.config, at: String::new() };
    let plan = match root.str("architecture")? {
        "moe_mlp" => stack(ck, &root)?,
        "mmoe" => multi_gate(ck, &root)?,
        a => return Err(HostError::Config(format!("architecture: unknown {a:?} (moe_mlp, mmoe)"))),
    };
    ck.check_all_used()?;

    let float_dtype = |d: Dtype| match d {
        Dtype::F16 => LayerDtype::F16,
        _ => LayerDtype::F32,
    };
    let calibration = match (dtype, calibration) {
        (Dtype::Int8 | Dtype::Q15, Some(x)) => {
            if x.is_empty() || !x.len().is_multiple_of(plan.input_dim) {
                return Err(HostError::Input(format!(
                    "calibration: {} values are not whole samples of {}",
                    x.len(),
                    plan.input_dim
                )));
            }
            Some(x.to_vec())
        }
        (Dtype::Int8 | Dtype::Q15, None) => {
            return Err(HostError::Input(
                "int8 and q15 need --calibration FILE (representative inputs)".into(),
            ));
        }
        _ => None,
    };
    let mut specs: Vec<LayerSpec> = Vec::new();
    let mut experts_from = Vec::new();
    let tasks = plan.chains.len();
    let total: usize = plan.chains.iter().map(Vec::len).sum();
    progress(0, total);
    for chain in plan.chains {
        // Every chain starts from the model input.
        let mut x = calibration.clone();
        for (i, m) in chain.into_iter().enumerate() {
            // Multi-gate MoE: every task's first layer routes over task 0's experts.
            let from = if plan.multi_gate && i == 0 { 0 } else { specs.len() };
            let base = (from != specs.len()).then(|| &specs[from]);
            let spec = match &mut x {
                Some(x) => {
                    let views = m.expert_views()?;
                    let layer = m.layer(&views)?;
                    let spec = match (dtype, base) {
                        (Dtype::Int8, Some(LayerSpec::Int8(b))) => LayerSpec::Int8(float_gate(
                            QMoeBuf::quantize_sharing(&layer, x, b)?,
                            &layer,
                            gate_dtype,
                        )),
                        (Dtype::Q15, Some(LayerSpec::Q15(b))) => LayerSpec::Q15(float_gate(
                            QMoeBuf::quantize_sharing(&layer, x, b)?,
                            &layer,
                            gate_dtype,
                        )),
                        (Dtype::Int8, _) => {
                            LayerSpec::Int8(float_gate(QMoeBuf::quantize(&layer, x)?, &layer, gate_dtype))
                        }
                        _ => LayerSpec::Q15(float_gate(QMoeBuf::quantize(&layer, x)?, &layer, gate_dtype)),
                    };
                    // The next layer is calibrated on this layer's float outputs.
                    let mut scratch = vec![0u8; layer.scratch_bytes()];
                    let mut next = vec![0.0; x.len() / layer.in_dim() * layer.out_dim()];
                    for (xi, yi) in x.chunks_exact(layer.in_dim()).zip(next.chunks_exact_mut(layer.out_dim()))
                    {
                        layer.infer(xi, yi, &mut scratch)?;
                    }
                    *x = next;
                    spec
                }
                None => LayerSpec::Float {
                    layer: m,
                    gate: float_dtype(gate_dtype.unwrap_or(dtype)),
                    experts: float_dtype(dtype),
                },
            };
            specs.push(spec);
            experts_from.push(from);
            progress(specs.len(), total);
        }
    }
    let spec = ModelSpec {
        task: plan.task,
        multi_gate: plan.multi_gate.then_some(tasks),
        layers: specs,
        experts_from,
    };
    Ok(write(&spec)?)
}
