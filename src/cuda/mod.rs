//! Batched MoE inference on NVIDIA GPUs (`cuda` feature), routed by the
//! crate's own [`Router`]: the GPU computes the gate logits
//! (in the CPU kernel's float order, so they are the CPU's bit for bit),
//! the host routes every token and builds the
//! [`DispatchPlan`] — the very code the MCU
//! runs — and the GPU runs the experts over each expert's gathered tokens
//! (SwiGLU fused) and combines them in router order, one thread per output
//! value: deterministic and independent of the batch.
//!
//! `cudarc` loads the driver and NVRTC dynamically, so the crate builds and
//! its tests run on machines without CUDA; [`CudaMoe::new`] then returns
//! [`CudaError::NoDriver`] or [`CudaError::NoDevice`] instead of panicking.
//! Kernels (`src/cuda/kernels.cu`) are compiled by NVRTC at run time.
//!
//! Supported now: float layers (f32 or f16 weights, f32 arithmetic) of
//! gated SiLU experts (Mixtral, Qwen2-MoE without a shared expert), no
//! biases, no selection bias.
// Kernel launches are `unsafe` in cudarc (the argument list is not checked
// against the kernel); each launch states why its arguments fit.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use crate::expert::Ffn;
use crate::kernels::{Activation, FloatWeight};
use crate::moe::{ExpertSource, MoeLayer};
use crate::router::{DispatchPlan, Router, Selection};
use crate::{Error, Expert};

const SOURCE: &str = include_str!("kernels.cu");

/// What can go wrong on the GPU side.
#[derive(Debug)]
pub enum CudaError {
    /// The CUDA driver library is not installed.
    NoDriver,
    /// The driver found no device.
    NoDevice,
    /// The layer is of a kind the CUDA backend does not run (yet).
    Unsupported(&'static str),
    /// A driver call failed.
    Driver(String),
    /// NVRTC could not compile the kernels.
    Compile(String),
    /// Bad input (shapes, NaN), as the CPU path reports it.
    Model(Error),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::NoDriver => f.write_str("no CUDA driver library on this machine"),
            CudaError::NoDevice => f.write_str("the CUDA driver found no device"),
            CudaError::Unsupported(what) => write!(f, "not supported by the CUDA backend: {what}"),
            CudaError::Driver(e) => write!(f, "CUDA driver: {e}"),
            CudaError::Compile(e) => write!(f, "NVRTC: {e}"),
            CudaError::Model(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<Error> for CudaError {
    fn from(e: Error) -> Self {
        CudaError::Model(e)
    }
}

fn driver<E: std::fmt::Debug>(e: E) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// The weight type on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights.
    F32,
    /// f16 weights (IEEE half bits), f32 arithmetic.
    F16,
}

enum Weights {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
}

/// A MoE layer resident on a GPU.
pub struct CudaMoe {
    stream: Arc<CudaStream>,
    gate_logits: CudaFunction,
    expert_hidden: CudaFunction,
    expert_out: CudaFunction,
    combine: CudaFunction,
    gate: Weights,
    w1: Weights,
    w3: Weights,
    w2: Weights,
    router: Router<'static>,
    d: usize,
    hidden: usize,
    experts: usize,
}

/// Checks for a driver and a device without creating anything.
pub fn available() -> Result<(), CudaError> {
    // SAFETY: only tries to load the driver library and reports whether it could.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(CudaError::NoDevice),
    }
}

fn upload(stream: &Arc<CudaStream>, values: &[f32], p: Precision) -> Result<Weights, CudaError> {
    Ok(match p {
        Precision::F32 => Weights::F32(stream.clone_htod(values).map_err(driver)?),
        Precision::F16 => {
            let bits: Vec<u16> = values.iter().map(|&v| crate::quant::f16::from_f32(v).to_bits()).collect();
            Weights::F16(stream.clone_htod(&bits).map_err(driver)?)
        }
    })
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}

impl CudaMoe {
    /// Uploads `layer` (weights converted to `precision`) to device 0 and
    /// compiles the kernels.
    pub fn new<'a, G, W, S>(layer: &MoeLayer<'a, G, W, S>, precision: Precision) -> Result<Self, CudaError>
    where
        G: FloatWeight,
        W: FloatWeight,
        S: ExpertSource<Expert = Expert<'a, W>>,
    {
        available()?;
        if layer.shared().is_some() {
            return Err(CudaError::Unsupported("shared experts"));
        }
        let rule = *layer.router().rule();
        if layer.router().bias().is_some() || layer.router().scaling() != 1.0 {
            return Err(CudaError::Unsupported("selection bias or routed scaling"));
        }
        let router = Router::new(rule, None, 1.0)?;
        let (d, experts) = (layer.in_dim(), rule.experts);
        let (mut w1, mut w3, mut w2) = (Vec::new(), Vec::new(), Vec::new());
        let mut hidden = 0;
        for e in 0..experts {
            let Some(expert) = layer.experts().expert(e) else {
                return Err(CudaError::Unsupported("missing expert"));
            };
            let Ffn::Gated { gate, up, act: Activation::Silu, down } = expert.ffn() else {
                return Err(CudaError::Unsupported("experts other than gated SiLU (SwiGLU)"));
            };
            if gate.bias().is_some() || up.bias().is_some() || down.bias().is_some() || down.rows() != d {
                return Err(CudaError::Unsupported("expert biases or output width other than input width"));
            }
            hidden = gate.rows();
            w1.extend(gate.weights().iter().map(|w| w.to_f32()));
            w3.extend(up.weights().iter().map(|w| w.to_f32()));
            w2.extend(down.weights().iter().map(|w| w.to_f32()));
        }
        if w1.len() != experts * hidden * d || w2.len() != experts * hidden * d {
            return Err(CudaError::Unsupported("experts of different widths"));
        }
        let gate: Vec<f32> = layer.gate().weights().iter().map(|w| w.to_f32()).collect();

        let ctx = CudaContext::new(0).map_err(driver)?;
        let stream = ctx.default_stream();
        let define = match precision {
            Precision::F32 => "#define WTYPE float\n",
            Precision::F16 => "#define WTYPE unsigned short\n",
        };
        let ptx = cudarc::nvrtc::compile_ptx(format!("{define}{SOURCE}"))
            .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let f = |name| module.load_function(name).map_err(driver);
        Ok(CudaMoe {
            gate_logits: f("gate_logits")?,
            expert_hidden: f("expert_hidden")?,
            expert_out: f("expert_out")?,
            combine: f("combine")?,
            gate: upload(&stream, &gate, precision)?,
            w1: upload(&stream, &w1, precision)?,
            w3: upload(&stream, &w3, precision)?,
            w2: upload(&stream, &w2, precision)?,
            stream,
            router,
            d,
            hidden,
            experts,
        })
    }

    /// Uploads layer `index` of a parsed `.moe` model: its f32 or f16
    /// weights as they are stored (f32 and f16 gates and experts in any
    /// mix; the device holds one type, f16 if the experts are f16).
    pub fn from_model(model: &crate::Model<'_>, index: usize) -> Result<Self, CudaError> {
        use crate::format::Layer;
        match model.layer(index)? {
            Layer::F32(l) => Self::new(&l, Precision::F32),
            Layer::F16(l) => Self::new(&l, Precision::F16),
            Layer::F32GateF16(l) => Self::new(&l, Precision::F16),
            Layer::F16GateF32(l) => Self::new(&l, Precision::F32),
            Layer::Int8(..) | Layer::Q15(..) => {
                Err(CudaError::Unsupported("integer layers (convert to f32 or f16)"))
            }
        }
    }

    /// Runs `xs` (`(tokens, width)` row-major) through the layer into `out`
    /// (same shape); returns each token's experts and weights. Same routing
    /// code, and so the same choices, as the CPU's `infer_batch`.
    pub fn infer_batch(&self, xs: &[f32], out: &mut [f32]) -> Result<Vec<Selection<f32>>, CudaError> {
        let d = self.d;
        if xs.is_empty() || !xs.len().is_multiple_of(d) || out.len() != xs.len() {
            return Err(Error::Shape { what: crate::What::Input, expected: d, actual: xs.len() }.into());
        }
        if let Some(index) = xs.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: crate::What::Input, index }.into());
        }
        let tokens = xs.len() / d;
        let (e, k, h) = (self.experts, self.router.rule().k, self.hidden);
        let s = &self.stream;
        let x = s.clone_htod(xs).map_err(driver)?;

        // Gate on the device, routing on the host.
        let mut logits_dev = s.alloc_zeros::<f32>(tokens * e).map_err(driver)?;
        let (t32, e32, d32, h32) = (tokens as i32, e as i32, d as i32, h as i32);
        {
            let mut b = s.launch_builder(&self.gate_logits);
            match &self.gate {
                Weights::F32(w) => b.arg(w),
                Weights::F16(w) => b.arg(w),
            };
            b.arg(&x).arg(&mut logits_dev).arg(&t32).arg(&e32).arg(&d32);
            // SAFETY: the argument list matches `gate_logits` in kernels.cu;
            // buffers hold tokens x experts and tokens x d values.
            unsafe { b.launch(grid(tokens * e)) }.map_err(driver)?;
        }
        let logits = s.clone_dtoh(&logits_dev).map_err(driver)?;
        let mut selections = Vec::with_capacity(tokens);
        for row in logits.chunks_exact(e) {
            let mut sel = Selection::new();
            self.router.route(row, &mut sel)?;
            selections.push(sel);
        }
        let plan = DispatchPlan::new(&selections, e)?;
        let entries = plan.tokens.len();
        let entry_token: Vec<i32> = plan.tokens.iter().map(|&t| t as i32).collect();
        let entry_expert: Vec<i32> =
            (0..e).flat_map(|ex| core::iter::repeat_n(ex as i32, plan.group(ex).tokens.len())).collect();
        let mut slot_entry = vec![-1i32; tokens * k];
        let mut slot_weight = vec![0.0f32; tokens * k];
        for (n, ((&t, &slot), &w)) in plan.tokens.iter().zip(&plan.slots).zip(&plan.weights).enumerate() {
            let at = t as usize * k + slot as usize;
            slot_entry[at] = n as i32;
            slot_weight[at] = w;
        }

        // Experts over the gathered tokens, then the combine.
        let tok_dev = s.clone_htod(&entry_token).map_err(driver)?;
        let exp_dev = s.clone_htod(&entry_expert).map_err(driver)?;
        let mut hid = s.alloc_zeros::<f32>((entries * h).max(1)).map_err(driver)?;
        let mut y = s.alloc_zeros::<f32>((entries * d).max(1)).map_err(driver)?;
        let n32 = entries as i32;
        if entries > 0 {
            let mut b = s.launch_builder(&self.expert_hidden);
            match (&self.w1, &self.w3) {
                (Weights::F32(a), Weights::F32(c)) => b.arg(a).arg(c),
                (Weights::F16(a), Weights::F16(c)) => b.arg(a).arg(c),
                _ => return Err(CudaError::Unsupported("mixed weight types")),
            };
            b.arg(&x).arg(&tok_dev).arg(&exp_dev).arg(&mut hid).arg(&n32).arg(&h32).arg(&d32);
            // SAFETY: matches `expert_hidden`; entry arrays hold `entries`
            // indices below tokens and experts, `hid` entries x hidden.
            unsafe { b.launch(grid(entries * h)) }.map_err(driver)?;
            let mut b = s.launch_builder(&self.expert_out);
            match &self.w2 {
                Weights::F32(w) => b.arg(w),
                Weights::F16(w) => b.arg(w),
            };
            b.arg(&hid).arg(&exp_dev).arg(&mut y).arg(&n32).arg(&d32).arg(&h32);
            // SAFETY: matches `expert_out`; `y` holds entries x d values.
            unsafe { b.launch(grid(entries * d)) }.map_err(driver)?;
        }
        let se_dev = s.clone_htod(&slot_entry).map_err(driver)?;
        let sw_dev = s.clone_htod(&slot_weight).map_err(driver)?;
        let mut out_dev = s.alloc_zeros::<f32>(tokens * d).map_err(driver)?;
        let k32 = k as i32;
        {
            let mut b = s.launch_builder(&self.combine);
            b.arg(&y).arg(&se_dev).arg(&sw_dev).arg(&mut out_dev).arg(&t32).arg(&k32).arg(&d32);
            // SAFETY: matches `combine`; slot arrays hold tokens x k values,
            // entries are -1 or below `entries`.
            unsafe { b.launch(grid(tokens * d)) }.map_err(driver)?;
        }
        out.copy_from_slice(&s.clone_dtoh(&out_dev).map_err(driver)?);
        Ok(selections)
    }
}
