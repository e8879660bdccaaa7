//! What the layer needs of a device — buffers, uploads, downloads and
//! launches of the kernels in `kernels.cu` — and its CUDA implementation.
//! The CPU emulator (`emu.rs`) is the other implementation, so the launch
//! sequence in `mod.rs` is the same code on both.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::{CudaError, Precision, SOURCE};

pub(super) fn driver<E: std::fmt::Debug>(e: E) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// Declares the kernels once: the enum, its names and the table order come
/// from the one list, so the loaded table cannot disagree with the enum
/// (a kernel added to the enum without a table entry was an index out of
/// bounds on every GPU launch of it, and the emulator, which looked names
/// up directly, could not see it).
macro_rules! kernels {
    ($($kernel:ident => $name:literal),* $(,)?) => {
        /// The kernels of `kernels.cu`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(super) enum Kernel {
            $(
                #[doc = concat!("`", $name, "`")]
                $kernel,
            )*
        }

        impl Kernel {
            /// Every kernel, in table order (`ALL[k as usize] == k`).
            pub(super) const ALL: &[Kernel] = &[$(Kernel::$kernel),*];

            /// The kernel's name in `kernels.cu`.
            pub(super) fn name(self) -> &'static str {
                match self {
                    $(Kernel::$kernel => $name,)*
                }
            }
        }
    };
}

kernels! {
    GateLogits => "gate_logits",
    ExpertHidden => "expert_hidden",
    ExpertOut => "expert_out",
    Combine => "combine",
    AddShared => "add_shared",
    Embed => "embed",
    GatherRows => "gather_rows",
    RmsScale => "rms_scale",
    RmsApply => "rms_apply",
    Linear => "linear",
    Rope => "rope",
    KvStore => "kv_store",
    AttnScores => "attn_scores",
    AttnSoftmax => "attn_softmax",
    AttnOut => "attn_out",
    Add => "add",
}

/// One loaded `T` per kernel (a CUDA function, an emulator name), built
/// from [`Kernel::ALL`]; both devices launch through it.
pub(super) struct KernelTable<T>(Vec<T>);

impl<T> KernelTable<T> {
    /// Loads every kernel by name.
    pub(super) fn load(mut f: impl FnMut(&'static str) -> Result<T, CudaError>) -> Result<Self, CudaError> {
        Ok(KernelTable(Kernel::ALL.iter().map(|k| f(k.name())).collect::<Result<_, _>>()?))
    }

    /// The loaded kernel `k`; an error (not a panic) if the table lacks it.
    pub(super) fn get(&self, k: Kernel) -> Result<&T, CudaError> {
        self.0.get(k as usize).ok_or_else(|| CudaError::Driver(format!("kernel {} not loaded", k.name())))
    }
}

/// Host data to upload.
#[derive(Clone, Copy)]
pub(super) enum Host<'a> {
    F32(&'a [f32]),
    /// f16 bits.
    U16(&'a [u16]),
    I32(&'a [i32]),
}

impl Host<'_> {
    pub(super) fn bytes(&self) -> Vec<u8> {
        match self {
            Host::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Host::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Host::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// A device buffer.
pub(super) enum Buf {
    F32(CudaSlice<f32>),
    U16(CudaSlice<u16>),
    I32(CudaSlice<i32>),
    Emu(super::emu::EmuBuf),
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub(super) enum Arg<'a> {
    Buf(&'a Buf),
    Int(i32),
}

/// A grid of blocks of `threads` threads (one-dimensional blocks).
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub grid: (u32, u32),
    pub threads: u32,
}

impl Shape {
    /// One thread per element, 256 per block.
    pub(super) fn elements(n: usize) -> Result<Self, CudaError> {
        let blocks = n.div_ceil(256);
        let x = u32::try_from(blocks).map_err(|_| CudaError::Unsupported("a batch this large"))?;
        Ok(Shape { grid: (x.max(1), 1), threads: 256 })
    }
}

pub(super) trait Device: Send + Sync {
    fn upload(&self, data: Host<'_>) -> Result<Buf, CudaError>;
    fn zeros(&self, n: usize) -> Result<Buf, CudaError>;
    fn download(&self, buf: &Buf, out: &mut [f32]) -> Result<(), CudaError>;
    fn launch(&self, kernel: Kernel, shape: Shape, args: &[Arg<'_>]) -> Result<(), CudaError>;
}

/// Device 0 through the CUDA driver.
pub(super) struct Cuda {
    stream: Arc<CudaStream>,
    functions: KernelTable<CudaFunction>,
}

impl Cuda {
    /// Compiles the kernels for `precision` with NVRTC and loads them.
    pub(super) fn new(precision: Precision) -> Result<Self, CudaError> {
        super::available()?;
        let ctx = CudaContext::new(0).map_err(driver)?;
        let ptx = cudarc::nvrtc::compile_ptx(format!("{}{SOURCE}", precision.define()))
            .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let functions = KernelTable::load(|name| module.load_function(name).map_err(driver))?;
        Ok(Cuda { stream: ctx.default_stream(), functions })
    }
}

impl Device for Cuda {
    fn upload(&self, data: Host<'_>) -> Result<Buf, CudaError> {
        let s = &self.stream;
        Ok(match data {
            Host::F32(v) => Buf::F32(s.clone_htod(v).map_err(driver)?),
            Host::U16(v) => Buf::U16(s.clone_htod(v).map_err(driver)?),
            Host::I32(v) => Buf::I32(s.clone_htod(v).map_err(driver)?),
        })
    }

    fn zeros(&self, n: usize) -> Result<Buf, CudaError> {
        Ok(Buf::F32(self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver)?))
    }

    fn download(&self, buf: &Buf, out: &mut [f32]) -> Result<(), CudaError> {
        let Buf::F32(b) = buf else { return Err(CudaError::Driver("download of a non-f32 buffer".into())) };
        let host = self.stream.clone_dtoh(b).map_err(driver)?;
        let n = out.len();
        out.copy_from_slice(
            host.get(..n).ok_or(CudaError::Driver("download larger than the buffer".into()))?,
        );
        Ok(())
    }

    fn launch(&self, kernel: Kernel, shape: Shape, args: &[Arg<'_>]) -> Result<(), CudaError> {
        let f = self.functions.get(kernel)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Buf(Buf::F32(s)) => b.arg(s),
                Arg::Buf(Buf::U16(s)) => b.arg(s),
                Arg::Buf(Buf::I32(s)) => b.arg(s),
                Arg::Buf(Buf::Emu(_)) => return Err(CudaError::Driver("an emulator buffer on a GPU".into())),
                Arg::Int(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (shape.grid.0, shape.grid.1, 1),
            block_dim: (shape.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        #[allow(unsafe_code)]
        // SAFETY: cudarc cannot check arguments against the kernel. The only
        // callers are the launches in `mod.rs`, whose argument lists follow
        // the signatures in kernels.cu (number and kind — buffer or int — are
        // checked against those signatures by the emulator in every test run)
        // and whose buffers hold what the shapes passed along say.
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_every_kernel_in_order() {
        let table = KernelTable::load(Ok).unwrap();
        for (i, &k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(k as usize, i);
            assert_eq!(*table.get(k).unwrap(), k.name());
            // Each is a kernel of the source the devices compile.
            assert!(SOURCE.contains(&format!("KERNEL void {}(", k.name())), "{}", k.name());
        }
        assert_eq!(SOURCE.matches("\nKERNEL void ").count(), Kernel::ALL.len());
    }
}
