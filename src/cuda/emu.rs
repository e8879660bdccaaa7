//! The CUDA kernels on the CPU: `emu.cpp` compiled with the host C++
//! compiler runs `kernels.cu` thread by thread, driven over a pipe by the same
//! launch sequence the GPU gets.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::device::{Arg, Buf, Device, Host, Kernel, KernelTable, Shape};
use super::{CudaError, Precision, SOURCE};

const EMULATOR: &str = include_str!("emu.cpp");

/// micromoe's CUDA kernels compiled for the CPU: slow (one OS thread per
/// CUDA thread), but the same kernel source, launch shapes and argument
/// lists as on a GPU, with the address and undefined-behaviour sanitizers
/// on, and a block whose threads meet different `__syncthreads` is refused.
/// It lets machines without a GPU (CI) test the CUDA backend's kernels and
/// launch code; see [`Target::Emulator`](super::Target::Emulator).
#[derive(Debug, Clone)]
pub struct Emulator {
    f32: PathBuf,
    f16: PathBuf,
}

impl Emulator {
    /// Compiles the emulator into `dir` (created if missing) with the C++
    /// compiler named by `$CXX`, else `c++` (C++20 and the sanitizers
    /// needed: GCC 12 or Clang 15 and later), with the address and
    /// undefined-behaviour sanitizers. A few seconds per weight type.
    pub fn compile(dir: impl AsRef<Path>) -> Result<Self, CudaError> {
        Self::build(dir.as_ref(), "address,undefined")
    }

    /// Like [`compile`](Self::compile), with the thread sanitizer instead:
    /// the threads of a block run concurrently, so a shared-memory read
    /// that a missing `__syncthreads` leaves unordered with another
    /// thread's write is reported as a data race.
    pub fn compile_race_check(dir: impl AsRef<Path>) -> Result<Self, CudaError> {
        Self::build(dir.as_ref(), "thread")
    }

    fn build(dir: &Path, sanitize: &str) -> Result<Self, CudaError> {
        let io = |e: std::io::Error| CudaError::Compile(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(dir.join("kernels.cu"), SOURCE).map_err(io)?;
        std::fs::write(dir.join("emu.cpp"), EMULATOR).map_err(io)?;
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let build = |p: Precision| -> Result<PathBuf, CudaError> {
            let out = dir.join(format!("emu-{p:?}-{}", sanitize.replace(',', "-")).to_lowercase());
            let wtype = p.define().trim().trim_start_matches("#define WTYPE ");
            let made = Command::new(&cxx)
                .args(["-std=c++20", "-O1", "-g", "-pthread", "-ffp-contract=off", "-fno-omit-frame-pointer"])
                .arg(format!("-fsanitize={sanitize}"))
                .arg("-fno-sanitize-recover=all")
                .arg(format!("-DWTYPE={wtype}"))
                .arg("-I")
                .arg(dir)
                .arg(dir.join("emu.cpp"))
                .arg("-o")
                .arg(&out)
                .output()
                .map_err(|e| CudaError::Compile(format!("{cxx}: {e}")))?;
            if !made.status.success() {
                return Err(CudaError::Compile(String::from_utf8_lossy(&made.stderr).into_owned()));
            }
            Ok(out)
        };
        Ok(Emulator { f32: build(Precision::F32)?, f16: build(Precision::F16)? })
    }

    pub(super) fn start(&self, precision: Precision) -> Result<EmuDevice, CudaError> {
        let bin = match precision {
            Precision::F32 => &self.f32,
            Precision::F16 => &self.f16,
        };
        let mut child = Command::new(bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .env("ASAN_OPTIONS", "detect_leaks=0")
            // A race report ends the process (the caller sees the error).
            .env("TSAN_OPTIONS", "halt_on_error=1 report_signal_unsafe=0")
            .spawn()
            .map_err(|e| CudaError::Driver(format!("emulator {}: {e}", bin.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(CudaError::Driver("emulator pipes".into()));
        };
        let pipe = Pipe { child, to: BufWriter::new(stdin), from: BufReader::new(stdout) };
        Ok(EmuDevice { pipe: Arc::new(Mutex::new(pipe)), kernels: KernelTable::load(Ok)? })
    }
}

struct Pipe {
    child: Child,
    to: BufWriter<ChildStdin>,
    from: BufReader<ChildStdout>,
}

impl Pipe {
    /// Sends `request`; reads `reply` bytes back when asked to.
    fn send(&mut self, request: &[u8]) -> Result<(), CudaError> {
        let sent = self.to.write_all(request).and_then(|()| self.to.flush());
        sent.map_err(|e| self.died(e))
    }

    fn read(&mut self, into: &mut [u8]) -> Result<(), CudaError> {
        self.from.read_exact(into).map_err(|e| self.died(e))
    }

    fn u32(&mut self) -> Result<u32, CudaError> {
        let mut b = [0; 4];
        self.read(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn died(&mut self, e: std::io::Error) -> CudaError {
        let status = self.child.try_wait().ok().flatten();
        CudaError::Driver(format!("emulator stopped ({e}; exit {status:?}; its report is on stderr)"))
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Closing stdin ends the emulator.
        let _ = self.to.flush();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A buffer in the emulator's memory; freed there when dropped.
pub(super) struct EmuBuf {
    id: u32,
    pipe: Arc<Mutex<Pipe>>,
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pipe.lock() {
            let mut req = vec![b'F'];
            req.extend(self.id.to_le_bytes());
            let _ = p.send(&req);
        }
    }
}

/// One running emulator process.
pub(super) struct EmuDevice {
    pipe: Arc<Mutex<Pipe>>,
    /// The same table the GPU launches through, so a kernel missing from
    /// it fails here too.
    kernels: KernelTable<&'static str>,
}

impl EmuDevice {
    fn pipe(&self) -> Result<std::sync::MutexGuard<'_, Pipe>, CudaError> {
        self.pipe.lock().map_err(|_| CudaError::Driver("emulator pipe poisoned".into()))
    }

    fn buffer(&self, op: u8, bytes: &[u8], len: usize) -> Result<Buf, CudaError> {
        let mut req = vec![op];
        req.extend((len as u64).to_le_bytes());
        req.extend_from_slice(bytes);
        let mut p = self.pipe()?;
        p.send(&req)?;
        let id = p.u32()?;
        Ok(Buf::Emu(EmuBuf { id, pipe: self.pipe.clone() }))
    }
}

fn id(buf: &Buf) -> Result<u32, CudaError> {
    match buf {
        Buf::Emu(b) => Ok(b.id),
        _ => Err(CudaError::Driver("a GPU buffer in the emulator".into())),
    }
}

impl Device for EmuDevice {
    fn upload(&self, data: Host<'_>) -> Result<Buf, CudaError> {
        let bytes = data.bytes();
        self.buffer(b'U', &bytes, bytes.len())
    }

    fn zeros(&self, n: usize) -> Result<Buf, CudaError> {
        self.buffer(b'A', &[], n.max(1) * 4)
    }

    fn download(&self, buf: &Buf, out: &mut [f32]) -> Result<(), CudaError> {
        let mut req = vec![b'D'];
        req.extend(id(buf)?.to_le_bytes());
        let mut p = self.pipe()?;
        p.send(&req)?;
        let mut len = [0; 8];
        p.read(&mut len)?;
        let mut bytes = vec![0; u64::from_le_bytes(len) as usize];
        p.read(&mut bytes)?;
        if bytes.len() < out.len() * 4 {
            return Err(CudaError::Driver("download larger than the buffer".into()));
        }
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    fn launch(&self, kernel: Kernel, shape: Shape, args: &[Arg<'_>]) -> Result<(), CudaError> {
        let name = self.kernels.get(kernel)?.as_bytes();
        let mut req = vec![b'L', name.len() as u8];
        req.extend_from_slice(name);
        for v in [shape.grid.0, shape.grid.1, 1, shape.threads, 1, 1] {
            req.extend(v.to_le_bytes());
        }
        req.push(args.len() as u8);
        for a in args {
            match a {
                Arg::Buf(b) => {
                    req.push(b'b');
                    req.extend(id(b)?.to_le_bytes());
                }
                Arg::Int(v) => {
                    req.push(b'i');
                    req.extend(v.to_le_bytes());
                }
            }
        }
        let mut p = self.pipe()?;
        p.send(&req)?;
        let mut status = [0];
        p.read(&mut status)?;
        if status[0] == 0 {
            return Ok(());
        }
        let len = p.u32()? as usize;
        let mut msg = vec![0; len];
        p.read(&mut msg)?;
        Err(CudaError::Driver(format!("{}: {}", kernel.name(), String::from_utf8_lossy(&msg))))
    }
}
