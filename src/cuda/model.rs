//! Stack and multi-gate models on the device: [`CudaModel`].

use super::device::{Buf, Device, Host};
use super::{CudaError, DeviceFfn, Precision, Target, ffn_parts};
use crate::error::{Error, What, check_len};
use crate::model::{Layer, Model};
use crate::router::Selection;

/// A float stack or multi-gate [`Model`] resident on a GPU (or in the
/// [`Emulator`](super::Emulator)): every layer's gate and experts uploaded
/// once, a batch of inputs run through each layer in turn (the gate on the
/// device, the routing on the host by the crate's router, the experts as
/// grouped GEMMs over the tokens routed to them), each task's layers from
/// the same input for a multi-gate model, its outputs side by side as
/// [`Model::infer`] writes them. Experts of any kind the `.moe` format
/// holds: gated units or MLPs, any activation, with or without biases.
/// Every output is summed by one thread in an order fixed by the shapes: the
/// same bits for a token alone or in any batch.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bytes = micromoe::format::write::AlignedBytes::from(&std::fs::read("digits_f32.moe")?[..]);
/// let model = micromoe::Model::parse(&bytes)?;
/// let gpu = micromoe::cuda::CudaModel::new(&model)?;
/// let xs = vec![0.0f32; 256 * model.input_dim()]; // 256 inputs
/// let mut out = vec![0.0; 256 * model.output_dim()];
/// let chosen = gpu.infer_batch(&xs, &mut out)?; // [layer][token] experts
/// # Ok(()) }
/// ```
pub struct CudaModel {
    device: Box<dyn Device>,
    layers: Vec<DeviceFfn>,
    tasks: usize,
    input_dim: usize,
    output_dim: usize,
    precision: Precision,
}

impl CudaModel {
    /// Uploads every layer of `model` to GPU 0 and compiles the kernels:
    /// f16 experts stay f16 when every layer's are (else all are f32, f16
    /// ones widened exactly); gates are f32. Integer models are
    /// [`CudaError::Unsupported`].
    pub fn new(model: &Model<'_>) -> Result<Self, CudaError> {
        Self::on(Target::Gpu, model)
    }

    /// Like [`new`](Self::new), on `target`.
    pub fn on(target: Target<'_>, model: &Model<'_>) -> Result<Self, CudaError> {
        let mut all_f16 = true;
        for l in 0..model.layers() {
            all_f16 &= match model.layer(l)? {
                Layer::F16(_) | Layer::F32GateF16(_) => true,
                Layer::F32(_) | Layer::F16GateF32(_) => false,
                Layer::Int8(..) | Layer::Q15(..) => {
                    return Err(CudaError::Unsupported("integer models (convert to f32 or f16)"));
                }
            };
        }
        let precision = if all_f16 { Precision::F16 } else { Precision::F32 };
        let device: Box<dyn Device> = match target {
            Target::Gpu => {
                super::available()?;
                Box::new(super::device::Cuda::new(precision)?)
            }
            Target::Emulator(emu) => Box::new(emu.start(precision)?),
        };
        let mut layers = Vec::with_capacity(model.layers());
        for l in 0..model.layers() {
            let parts = match model.layer(l)? {
                Layer::F32(x) => ffn_parts(&x)?,
                Layer::F16(x) => ffn_parts(&x)?,
                Layer::F32GateF16(x) => ffn_parts(&x)?,
                Layer::F16GateF32(x) => ffn_parts(&x)?,
                Layer::Int8(..) | Layer::Q15(..) => return Err(CudaError::Unsupported("integer layers")),
            };
            layers.push(parts.upload(&*device, precision)?);
        }
        Ok(CudaModel {
            device,
            layers,
            tasks: model.tasks().max(1),
            input_dim: model.input_dim(),
            output_dim: model.output_dim(),
            precision,
        })
    }

    /// The expert weights' type on the device.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs `xs` (`(tokens, input_dim)` row-major) into `out` (`(tokens,
    /// output_dim)`); returns every layer's choices, `[layer][token]`. The
    /// CPU's checks: shapes, finite inputs; an output that overflowed is
    /// [`Error::NonFinite`].
    pub fn infer_batch(&self, xs: &[f32], out: &mut [f32]) -> Result<Vec<Vec<Selection<f32>>>, CudaError> {
        let d = self.input_dim;
        if xs.is_empty() || !xs.len().is_multiple_of(d) {
            return Err(Error::Shape { what: What::Input, expected: d, actual: xs.len() }.into());
        }
        let tokens = xs.len() / d;
        check_len(What::Output, tokens * self.output_dim, out.len())?;
        crate::error::check_finite(What::Input, xs)?;
        let dev = &*self.device;
        let input = dev.upload(Host::F32(xs))?;
        let per_task = self.layers.len() / self.tasks;
        let mut chosen = Vec::with_capacity(self.layers.len());
        let mut written = 0;
        for task in self.layers.chunks(per_task.max(1)) {
            let mut x: Option<Buf> = None;
            let mut width = d;
            for layer in task {
                let (y, sel) = layer.run(dev, x.as_ref().unwrap_or(&input), tokens)?;
                chosen.push(sel);
                x = Some(y);
                width = layer.out;
            }
            let mut part = vec![0.0f32; tokens * width];
            dev.download(x.as_ref().unwrap_or(&input), &mut part)?;
            // Each token's outputs: the tasks' side by side.
            if written + width > self.output_dim {
                return Err(Error::Shape {
                    what: What::Output,
                    expected: written + width,
                    actual: self.output_dim,
                }
                .into());
            }
            for (t, row) in part.chunks_exact(width).enumerate() {
                let at = t * self.output_dim + written;
                out[at..at + width].copy_from_slice(row);
            }
            written += width;
        }
        crate::error::check_finite(What::Hidden, out)?;
        Ok(chosen)
    }
}
