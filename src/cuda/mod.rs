//! Batched MoE inference on NVIDIA GPUs (`cuda` feature), routed by the
//! crate's own [`Router`]: the GPU computes the gate logits
//! (in the CPU kernel's float order, so they are the CPU's bit for bit),
//! the host routes every token and builds the
//! [`DispatchPlan`] — the very code the MCU
//! runs — and the GPU runs the experts as a grouped GEMM over each expert's
//! gathered tokens (64 x 64 output tiles staged through shared memory,
//! the gated unit or activation and biases fused) and combines them in router order. Every output value is
//! summed by one thread in an order that depends only on the shapes:
//! deterministic and independent of the batch.
//!
//! `cudarc` loads the driver and NVRTC dynamically, so the crate builds and
//! its tests run on machines without CUDA; [`CudaMoe::new`] then returns
//! [`CudaError::NoDriver`], [`CudaError::NoDevice`] or
//! [`CudaError::NoNvrtc`] instead of panicking.
//! Kernels (`src/cuda/kernels.cu`) are compiled by NVRTC at run time.
//!
//! [`Emulator`] runs the same kernels on the CPU, compiled by the host C++
//! compiler: [`Target::Emulator`] drives them with the same launch code, so
//! machines without a GPU test the kernels and the launches (slowly).
//!
//! Supported: float layers (f32 or f16 expert weights, f32 gate and
//! arithmetic) routed by any rule the crate has (softmax or sigmoid,
//! groups, selection bias, routed scaling), with experts of any kind the
//! format holds (gated units or MLPs, ReLU / GELU / SiLU, with or without
//! biases, output width of their own): Mixtral, Qwen2-MoE with its
//! sigmoid-gated shared expert, DeepSeek-style layers with an ungated one,
//! Switch and GLaM MLPs ([`CudaMoe`]); whole stack and multi-gate models
//! ([`CudaModel`]); and whole f32 / f16 decoders (Mixtral, Qwen2-MoE) with
//! a KV cache per sequence on the device, prompts prefilled as one batch and
//! several sequences decoded at once ([`CudaDecoder`]). Not (yet): integer
//! layers, models and decoders.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use micromoe::cuda::{CudaMoe, Emulator, Target};
//! let bytes = micromoe::format::write::AlignedBytes::from(&std::fs::read("layer.moe")?[..]);
//! let model = micromoe::Model::parse(&bytes)?;
//! // GPU 0, or the same kernels on the CPU where there is none:
//! let layer = match micromoe::cuda::available() {
//!     Ok(()) => CudaMoe::from_model(&model, 0)?,
//!     Err(_) => CudaMoe::from_model_on(Target::Emulator(&Emulator::compile("target/emu")?), &model, 0)?,
//! };
//! let width = 1024; // the layer's input width
//! let xs = vec![0.1f32; 4 * width]; // four tokens
//! let mut out = vec![0.0; xs.len()];
//! let chosen = layer.infer_batch(&xs, &mut out)?; // each token's experts and weights
//! # Ok(()) }
//! ```
mod decoder;
mod device;
mod emu;
mod model;

use crate::expert::Ffn;
use crate::kernels::{Activation, FloatWeight};
use crate::moe::{ExpertSource, MoeLayer};
use crate::router::{DispatchPlan, Router, Selection};
use crate::{Error, Expert};
pub use decoder::{CudaDecoder, Sequence};
use device::{Arg, Buf, Cuda, Device, Host, Kernel, Shape};
pub use emu::Emulator;
pub use model::CudaModel;

const SOURCE: &str = include_str!("kernels.cu");

/// Entries per tile of the grouped GEMM (`TILE_M` in kernels.cu).
const TILE_M: usize = 64;
/// Outputs per tile (`TILE_N`).
const TILE_N: usize = 64;
/// Threads per tile (`TILE_THREADS`).
const TILE_THREADS: u32 = 256;

/// What can go wrong on the GPU side.
#[derive(Debug)]
pub enum CudaError {
    /// The CUDA driver library is not installed.
    NoDriver,
    /// The driver found no device.
    NoDevice,
    /// The NVRTC library (the CUDA toolkit's run-time compiler) is not
    /// installed or not on the library path.
    NoNvrtc,
    /// The layer is of a kind the CUDA backend does not run (yet).
    Unsupported(&'static str),
    /// A driver call failed.
    Driver(String),
    /// NVRTC could not compile the kernels.
    Compile(String),
    /// Bad input (shapes, NaN), as the CPU path reports it.
    Model(Error),
    /// A [`Sequence`] used where it cannot be: of another decoder, twice
    /// in one batch, or none free.
    Sequence(&'static str),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::NoDriver => f.write_str("no CUDA driver library on this machine"),
            CudaError::NoDevice => f.write_str("the CUDA driver found no device"),
            CudaError::NoNvrtc => f.write_str(
                "no NVRTC library (libnvrtc.so, .so.12) on the library path: install the CUDA toolkit's NVRTC \
                 or add its folder to LD_LIBRARY_PATH",
            ),
            CudaError::Unsupported(what) => write!(f, "not supported by the CUDA backend: {what}"),
            CudaError::Driver(e) => write!(f, "CUDA driver: {e}"),
            CudaError::Compile(e) => write!(f, "compiling the kernels: {e}"),
            CudaError::Model(e) => write!(f, "{e}"),
            CudaError::Sequence(why) => write!(f, "sequence: {why}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<Error> for CudaError {
    fn from(e: Error) -> Self {
        CudaError::Model(e)
    }
}

/// The weight type on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights.
    F32,
    /// f16 weights (IEEE half bits), f32 arithmetic.
    F16,
}

impl Precision {
    /// The kernels' weight type.
    fn define(self) -> &'static str {
        match self {
            Precision::F32 => "#define WTYPE float\n",
            Precision::F16 => "#define WTYPE unsigned short\n",
        }
    }
}

/// Where a [`CudaMoe`] runs.
#[derive(Debug, Clone, Copy)]
pub enum Target<'e> {
    /// GPU 0, through the CUDA driver.
    Gpu,
    /// The kernels on the CPU, in an [`Emulator`] process.
    Emulator(&'e Emulator),
}

/// A MoE layer resident on a GPU (or in the [`Emulator`]).
pub struct CudaMoe {
    device: Box<dyn Device>,
    ffn: DeviceFfn,
}

/// A MoE (or dense) FFN's weights on a device: a layer of [`CudaMoe`],
/// [`CudaModel`] or [`CudaDecoder`].
struct DeviceFfn {
    /// Gate rows, f32: the routed experts', then the shared expert's gate
    /// (if it has one); `None` when there are neither.
    gate: Option<Buf>,
    routed: Option<Routed>,
    shared: Option<Shared>,
    /// Input and output widths.
    d: usize,
    out: usize,
}

/// The routed experts and their router's rule.
struct Routed {
    experts: DevExperts,
    rule: crate::Rule,
    bias: Option<Vec<f32>>,
    scaling: f32,
}

/// The always-on expert (Qwen2-MoE, DeepSeek, a decoder's dense FFN): run
/// over every token.
struct Shared {
    experts: DevExperts,
    /// Scaled by sigmoid(shared gate . x) (Qwen2-MoE); else added as is.
    gated: bool,
}

/// Experts of one shape on the device, expert after expert: `w1` the gate
/// (gated units) or up projection (MLPs), `w3` the up projection of gated
/// units, `w2` the down projection; biases (f32) when the experts have them.
struct DevExperts {
    w1: Buf,
    w3: Option<Buf>,
    w2: Buf,
    biases: Option<[Buf; 3]>,
    act: i32,
    hidden: usize,
}

/// One matrix of an expert, as f32 values.
struct Mat {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Mat {
    fn of<W: FloatWeight>(l: &crate::kernels::Linear<'_, W>) -> Result<Self, CudaError> {
        let values = l.weights().iter().map(|w| w.to_f32()).collect();
        Ok(Mat { rows: l.rows(), cols: l.cols(), values, bias: l.bias().map(<[f32]>::to_vec) })
    }
}

/// The kernels' code for an activation (`activate` in kernels.cu).
fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Silu => 3,
    }
}

/// Experts of one shape gathered for upload, expert after expert.
#[derive(Default)]
struct HostExperts {
    w: [Vec<f32>; 3],
    b: [Vec<f32>; 3],
    /// (gated, activation code, biased, hidden, out) of the first expert.
    shape: Option<(bool, i32, bool, usize, usize)>,
}

impl HostExperts {
    /// Adds an expert (`d` inputs) whose matrices `m` reads.
    fn push<L>(
        &mut self,
        ffn: &Ffn<L>,
        d: usize,
        m: impl Fn(&L) -> Result<Mat, CudaError>,
    ) -> Result<(), CudaError> {
        let (act, first, second, down) = match ffn {
            Ffn::Gated { gate, up, act, down } => (*act, m(gate)?, Some(m(up)?), m(down)?),
            Ffn::Mlp { up, act, down } => (*act, m(up)?, None, m(down)?),
        };
        let (hidden, out) = (first.rows, down.rows);
        let fits = |x: &Mat| x.rows == hidden && x.cols == d;
        if !fits(&first) || !second.as_ref().is_none_or(fits) || down.cols != hidden {
            return Err(CudaError::Unsupported("experts whose matrices do not chain"));
        }
        let biased =
            first.bias.is_some() || second.as_ref().is_some_and(|s| s.bias.is_some()) || down.bias.is_some();
        let shape = (second.is_some(), act_code(act), biased, hidden, out);
        if self.shape.is_some_and(|s| s != shape) {
            return Err(CudaError::Unsupported("experts of different shapes in one layer"));
        }
        self.shape = Some(shape);
        for (i, x) in [Some(first), second, Some(down)].into_iter().enumerate() {
            let Some(x) = x else { continue };
            self.w[i].extend(&x.values);
            if biased {
                // A missing bias is zeros: the same sums.
                let zeros = vec![0.0; x.rows];
                self.b[i].extend(x.bias.as_deref().unwrap_or(&zeros));
            }
        }
        Ok(())
    }

    fn upload(&self, dev: &dyn Device, p: Precision, d: usize) -> Result<DevExperts, CudaError> {
        let (gated, act, biased, hidden, out) = self.shape.ok_or(CudaError::Unsupported("no experts"))?;
        int(self.w[0].len().max(self.w[2].len()))?;
        int(hidden.max(out).max(d))?;
        let biases = if biased {
            let b = |v: &Vec<f32>| dev.upload(Host::F32(if v.is_empty() { &[0.0] } else { v }));
            Some([b(&self.b[0])?, b(&self.b[1])?, b(&self.b[2])?])
        } else {
            None
        };
        Ok(DevExperts {
            w1: upload(dev, &self.w[0], p)?,
            w3: if gated { Some(upload(dev, &self.w[1], p)?) } else { None },
            w2: upload(dev, &self.w[2], p)?,
            biases,
            act,
            hidden,
        })
    }

    fn out(&self) -> usize {
        self.shape.map_or(0, |s| s.4)
    }
}

/// What a [`DeviceFfn`] is made from, gathered on the host.
struct FfnParts {
    /// Gate rows (`(experts, d)`, then the shared gate's row, if any).
    gate: Vec<f32>,
    routed: Option<(HostExperts, crate::Rule, Option<Vec<f32>>, f32)>,
    shared: Option<(HostExperts, bool)>,
    d: usize,
}

impl FfnParts {
    fn upload(self, device: &dyn Device, precision: Precision) -> Result<DeviceFfn, CudaError> {
        let d = self.d;
        let out =
            self.routed.as_ref().map(|r| r.0.out()).or(self.shared.as_ref().map(|s| s.0.out())).unwrap_or(d);
        if self.shared.as_ref().is_some_and(|s| s.0.out() != out) {
            return Err(CudaError::Unsupported("a shared expert of another output width"));
        }
        let routed = match self.routed {
            Some((e, rule, bias, scaling)) => {
                Some(Routed { experts: e.upload(device, precision, d)?, rule, bias, scaling })
            }
            None => None,
        };
        let shared = match self.shared {
            Some((e, gated)) => Some(Shared { experts: e.upload(device, precision, d)?, gated }),
            None => None,
        };
        let gate = if self.gate.is_empty() { None } else { Some(device.upload(Host::F32(&self.gate))?) };
        Ok(DeviceFfn { gate, routed, shared, d, out })
    }
}

/// Checks for a driver, a device and NVRTC without creating anything.
pub fn available() -> Result<(), CudaError> {
    #[allow(unsafe_code)]
    // SAFETY: only tries to load the driver library and reports whether it could.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        _ => return Err(CudaError::NoDevice),
    }
    // cudarc panics when it cannot load NVRTC: ask first.
    #[allow(unsafe_code)]
    // SAFETY: only tries to load the NVRTC library and reports whether it could.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    Ok(())
}

fn upload(device: &dyn Device, values: &[f32], p: Precision) -> Result<Buf, CudaError> {
    match p {
        Precision::F32 => device.upload(Host::F32(values)),
        Precision::F16 => {
            let bits: Vec<u16> = values.iter().map(|&v| crate::quant::f16::from_f32(v).to_bits()).collect();
            device.upload(Host::U16(&bits))
        }
    }
}

/// Each expert's entries cut into tiles of at most [`TILE_M`]:
/// (expert, first entry, entries) for the grouped GEMM.
fn tiles(offsets: &[usize]) -> Vec<i32> {
    let mut t = Vec::new();
    for (e, w) in offsets.windows(2).enumerate() {
        for first in (w[0]..w[1]).step_by(TILE_M) {
            t.extend([e as i32, first as i32, (w[1] - first).min(TILE_M) as i32]);
        }
    }
    t
}

fn int(n: usize) -> Result<i32, CudaError> {
    i32::try_from(n).map_err(|_| CudaError::Unsupported("sizes beyond i32"))
}

impl CudaMoe {
    /// Uploads `layer` to GPU 0 (expert weights converted to `precision`,
    /// the gate as f32) and compiles the kernels.
    pub fn new<'a, G, W, S>(layer: &MoeLayer<'a, G, W, S>, precision: Precision) -> Result<Self, CudaError>
    where
        G: FloatWeight,
        W: FloatWeight,
        S: ExpertSource<Expert = Expert<'a, W>>,
    {
        Self::on(Target::Gpu, layer, precision)
    }

    /// Like [`new`](Self::new), on `target`.
    pub fn on<'a, G, W, S>(
        target: Target<'_>,
        layer: &MoeLayer<'a, G, W, S>,
        precision: Precision,
    ) -> Result<Self, CudaError>
    where
        G: FloatWeight,
        W: FloatWeight,
        S: ExpertSource<Expert = Expert<'a, W>>,
    {
        match target {
            Target::Gpu => {
                available()?;
                Self::upload(layer, precision, || Ok(Box::new(Cuda::new(precision)?)))
            }
            Target::Emulator(emu) => Self::upload(layer, precision, || Ok(Box::new(emu.start(precision)?))),
        }
    }

    fn upload<'a, G, W, S>(
        layer: &MoeLayer<'a, G, W, S>,
        precision: Precision,
        device: impl FnOnce() -> Result<Box<dyn Device>, CudaError>,
    ) -> Result<Self, CudaError>
    where
        G: FloatWeight,
        W: FloatWeight,
        S: ExpertSource<Expert = Expert<'a, W>>,
    {
        let parts = ffn_parts(layer)?;
        let device = device()?;
        let ffn = parts.upload(&*device, precision)?;
        Ok(CudaMoe { device, ffn })
    }

    /// Uploads layer `index` of a parsed `.moe` model: its f32 or f16
    /// weights as they are stored (f32 and f16 gates and experts in any
    /// mix; the gate is widened to f32 on the device, exactly).
    pub fn from_model(model: &crate::Model<'_>, index: usize) -> Result<Self, CudaError> {
        Self::from_model_on(Target::Gpu, model, index)
    }

    /// Like [`from_model`](Self::from_model), on `target`.
    pub fn from_model_on(
        target: Target<'_>,
        model: &crate::Model<'_>,
        index: usize,
    ) -> Result<Self, CudaError> {
        use crate::model::Layer;
        match model.layer(index)? {
            Layer::F32(l) => Self::on(target, &l, Precision::F32),
            Layer::F16(l) => Self::on(target, &l, Precision::F16),
            Layer::F32GateF16(l) => Self::on(target, &l, Precision::F16),
            Layer::F16GateF32(l) => Self::on(target, &l, Precision::F32),
            Layer::Int8(..) | Layer::Q15(..) => {
                Err(CudaError::Unsupported("integer layers (convert to f32 or f16)"))
            }
        }
    }

    /// Runs `xs` (`(tokens, width)` row-major) through the layer into `out`
    /// (same shape); returns each token's experts and weights. Same routing
    /// code, and so the same choices, as the CPU's `infer_batch`.
    pub fn infer_batch(&self, xs: &[f32], out: &mut [f32]) -> Result<Vec<Selection<f32>>, CudaError> {
        let d = self.ffn.d;
        if xs.is_empty() || !xs.len().is_multiple_of(d) {
            return Err(Error::Shape { what: crate::What::Input, expected: d, actual: xs.len() }.into());
        }
        crate::error::check_len(crate::What::Output, xs.len() / d * self.ffn.out, out.len())?;
        if let Some(index) = xs.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: crate::What::Input, index }.into());
        }
        let dev = &*self.device;
        let x = dev.upload(Host::F32(xs))?;
        let (y, selections) = self.ffn.run(dev, &x, xs.len() / d)?;
        dev.download(&y, out)?;
        Ok(selections)
    }
}

impl DeviceFfn {
    /// `ffn(x)` for the `tokens` rows of `x` (`(tokens, d)` on `dev`): the
    /// gate on the device, each token routed on the host by the crate's
    /// [`Router`] (the CPU's code), each expert's tokens through the grouped
    /// GEMMs, combined in router order, then the shared expert added, as the
    /// CPU adds it. Returns the output on the device and each token's
    /// selection (empty for a dense FFN).
    fn run(&self, dev: &dyn Device, x: &Buf, tokens: usize) -> Result<(Buf, Vec<Selection<f32>>), CudaError> {
        let (d, out) = (self.d, self.out);
        let experts = self.routed.as_ref().map_or(0, |r| r.rule.experts);
        let gated = self.shared.as_ref().is_some_and(|s| s.gated);
        // Gate rows: the experts', then the shared expert's gate, if any.
        let rows = experts + gated as usize;
        let hidden = self
            .routed
            .as_ref()
            .map_or(0, |r| r.experts.hidden)
            .max(self.shared.as_ref().map_or(0, |s| s.experts.hidden));
        int(tokens * d.max(out).max(rows).max(hidden))?;
        let mut logits = vec![0.0; tokens * rows];
        if let Some(gate) = &self.gate {
            let logits_dev = dev.zeros(tokens * rows)?;
            let args = [
                Arg::Buf(gate),
                Arg::Buf(x),
                Arg::Buf(&logits_dev),
                Arg::Int(tokens as i32),
                Arg::Int(rows as i32),
                Arg::Int(d as i32),
            ];
            dev.launch(Kernel::GateLogits, Shape::elements(tokens * rows)?, &args)?;
            dev.download(&logits_dev, &mut logits)?;
        }
        let out_dev = dev.zeros(tokens * out)?;
        let mut selections = Vec::with_capacity(tokens);
        if let Some(routed) = &self.routed {
            let k = routed.rule.k;
            let router = Router::new(routed.rule, routed.bias.as_deref(), routed.scaling)?;
            for row in logits.chunks_exact(rows) {
                let mut sel = Selection::new();
                router.route(&row[..experts], &mut sel)?;
                selections.push(sel);
            }
            let plan = DispatchPlan::new(&selections, experts)?;
            let entries = plan.tokens.len();
            let entry_token: Vec<i32> = plan.tokens.iter().map(|&t| t as i32).collect();
            let mut slot_entry = vec![-1i32; tokens * k];
            let mut slot_weight = vec![0.0f32; tokens * k];
            for (n, ((&t, &slot), &w)) in plan.tokens.iter().zip(&plan.slots).zip(&plan.weights).enumerate() {
                let at = t as usize * k + slot as usize;
                slot_entry[at] = n as i32;
                slot_weight[at] = w;
            }
            // The grouped GEMMs over each expert's gathered tokens, then the combine.
            let y = dev.zeros(entries * out)?;
            if entries > 0 {
                int(entries * routed.experts.hidden.max(out))?;
                run_experts(dev, &routed.experts, x, &entry_token, &tiles(&plan.offsets), (d, out), &y)?;
            }
            let se_dev = dev.upload(Host::I32(&slot_entry))?;
            let sw_dev = dev.upload(Host::F32(&slot_weight))?;
            let args = [&y, &se_dev, &sw_dev, &out_dev].map(Arg::Buf);
            let ints = [tokens, k, out].map(|v| Arg::Int(v as i32));
            let args = [args[0], args[1], args[2], args[3], ints[0], ints[1], ints[2]];
            dev.launch(Kernel::Combine, Shape::elements(tokens * out)?, &args)?;
        } else {
            selections.resize(tokens, Selection::new());
        }

        // The shared expert over every token, added last, as the CPU adds it.
        if let Some(sh) = &self.shared {
            let all: Vec<i32> = (0..tokens as i32).collect();
            let sy = dev.zeros(tokens * out)?;
            run_experts(dev, &sh.experts, x, &all, &tiles(&[0, tokens]), (d, out), &sy)?;
            // sigmoid(shared gate . x) on the host from the device's logit:
            // the CPU's formula on the CPU's bits.
            let scale: Vec<f32> = match sh.gated {
                true => logits.chunks_exact(rows).map(|r| crate::router::sigmoid(r[experts])).collect(),
                false => vec![1.0; tokens],
            };
            let scale_dev = dev.upload(Host::F32(&scale))?;
            let args = [&sy, &scale_dev, &out_dev].map(Arg::Buf);
            let args = [args[0], args[1], args[2], Arg::Int(tokens as i32), Arg::Int(out as i32)];
            dev.launch(Kernel::AddShared, Shape::elements(tokens * out)?, &args)?;
        }
        Ok((out_dev, selections))
    }
}

/// A float MoE layer's weights gathered for upload.
fn ffn_parts<'a, G, W, S>(layer: &MoeLayer<'a, G, W, S>) -> Result<FfnParts, CudaError>
where
    G: FloatWeight,
    W: FloatWeight,
    S: ExpertSource<Expert = Expert<'a, W>>,
{
    let rule = *layer.router().rule();
    let (d, experts) = (layer.in_dim(), rule.experts);
    let gate_bias = layer.shared().and_then(|s| s.gate.as_ref()).is_some_and(|g| g.bias().is_some());
    if layer.gate().bias().is_some() || gate_bias {
        return Err(CudaError::Unsupported("router gates with a bias"));
    }
    let mut routed = HostExperts::default();
    for e in 0..experts {
        let expert = layer.experts().expert(e).map_err(CudaError::Model)?;
        routed.push(expert.ffn(), d, Mat::of)?;
    }
    let mut gate: Vec<f32> = layer.gate().weights().iter().map(|w| w.to_f32()).collect();
    let mut shared = None;
    if let Some(s) = layer.shared() {
        let mut e = HostExperts::default();
        e.push(s.expert.ffn(), d, Mat::of)?;
        if let Some(g) = &s.gate {
            // The shared expert's gate row rides along as one more logit.
            gate.extend(g.weights().iter().map(|w| w.to_f32()));
        }
        shared = Some((e, s.gate.is_some()));
    }
    let bias = layer.router().bias().map(<[f32]>::to_vec);
    Ok(FfnParts { gate, routed: Some((routed, rule, bias, layer.router().scaling())), shared, d })
}

/// `y[n] = w2 (act(w1 x[rows[n]] + b1) * (w3 x[rows[n]] + b3)) + b2` (gated
/// units) or `w2 act(w1 x[rows[n]] + b1) + b2` (MLPs) for the entries of
/// `tiles`: the two grouped GEMMs.
fn run_experts(
    dev: &dyn Device,
    e: &DevExperts,
    x: &Buf,
    rows: &[i32],
    tiles: &[i32],
    (d, out): (usize, usize),
    y: &Buf,
) -> Result<(), CudaError> {
    let tiles_dev = dev.upload(Host::I32(tiles))?;
    let rows_dev = dev.upload(Host::I32(rows))?;
    let hid = dev.zeros(rows.len() * e.hidden)?;
    let grid = |outputs: usize| -> Result<Shape, CudaError> {
        let x = u32::try_from(tiles.len() / 3).map_err(|_| CudaError::Unsupported("a batch this large"))?;
        let y = u32::try_from(outputs.div_ceil(TILE_N)).ok().filter(|&y| y <= 65_535);
        Ok(Shape { grid: (x, y.ok_or(CudaError::Unsupported("layers this wide"))?), threads: TILE_THREADS })
    };
    let i = |v: usize| Arg::Int(v as i32);
    let (tl, hb) = (Arg::Buf(&tiles_dev), Arg::Buf(&hid));
    // Without biases (or w3) the kernel reads none: `w1` stands in.
    let b = |j: usize| Arg::Buf(e.biases.as_ref().map_or(&e.w1, |b| &b[j]));
    let biased = i(e.biases.is_some() as usize);
    let w3 = Arg::Buf(e.w3.as_ref().unwrap_or(&e.w1));
    let args = [Arg::Buf(&e.w1), w3, Arg::Buf(x), Arg::Buf(&rows_dev), tl, hb, i(e.hidden), i(d)];
    let args = [&args[..], &[b(0), b(1), biased, Arg::Int(e.act), i(e.w3.is_some() as usize)]].concat();
    dev.launch(Kernel::ExpertHidden, grid(e.hidden)?, &args)?;
    let args = [Arg::Buf(&e.w2), hb, tl, Arg::Buf(y), i(out), i(e.hidden), b(2), biased];
    dev.launch(Kernel::ExpertOut, grid(out)?, &args)
}
