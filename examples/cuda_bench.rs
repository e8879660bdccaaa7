//! Tokens per second of a Mixtral-style layer (width 1024, 8 SwiGLU experts
//! of 2048, top-2) on the GPU beside the CPU batched path, at 1, 16, 256 and
//! 4096 tokens, f32 and f16 weights. Needs `--features cuda` and a GPU; says
//! why and exits 0 without one.
//!
//! `--emulator` runs the same program on the CPU emulator of the kernels
//! with a layer 16 times narrower and at most 16 tokens: the figures mean
//! nothing, but every step the GPU run takes is exercised (CI runs it).
//!
//! ```text
//! cargo run --release --features cuda --example cuda_bench [-- --emulator]
//! ```

use std::time::Instant;

use micromoe::Rule;
use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::cuda::{CudaMoe, Emulator, Precision, Target, available};
use micromoe::kernels::Activation;

const E: usize = 8;

fn values(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect()
}

fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    start.elapsed().as_secs_f64() / runs as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let emulated = std::env::args().any(|a| a == "--emulator");
    let emulator;
    let (target, d, h, batches): (Target<'_>, usize, usize, &[usize]) = if emulated {
        emulator = Emulator::compile(std::env::temp_dir().join("micromoe-cuda-bench-emulator"))?;
        (Target::Emulator(&emulator), 64, 128, &[1, 16])
    } else {
        if let Err(e) = available() {
            println!("cuda_bench: skipped ({e})");
            return Ok(());
        }
        (Target::Gpu, 1024, 2048, &[1, 16, 256, 4096])
    };
    let mut seed = 3;
    let lin = |r, c, s: &mut u64| LinearBuf::new(values(r * c, s), None, r, c);
    let experts: Vec<ExpertBuf<f32>> = (0..E)
        .map(|_| {
            ExpertBuf::gated(
                lin(h, d, &mut seed),
                lin(h, d, &mut seed),
                lin(d, h, &mut seed),
                Activation::Silu,
            )
        })
        .collect();
    let moe = MoeBuf::new(lin(E, d, &mut seed), experts, Rule::mixtral(E, 2));
    let views = moe.expert_views()?;
    let layer = moe.layer(&views)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpu32 = CudaMoe::on(target, &layer, Precision::F32)?;
    let gpu16 = CudaMoe::on(target, &layer, Precision::F16)?;
    let on = if emulated { "emulator" } else { "GPU" };
    println!("Mixtral-style layer: width {d}, {E} SwiGLU experts of {h}, top-2; tokens/s");
    println!(
        "{:>6} {:>14} {:>14} {:>16}",
        "tokens",
        format!("{on} f32"),
        format!("{on} f16"),
        format!("CPU f32 ({threads} thr)")
    );
    for &n in batches {
        let xs = values(n * d, &mut seed);
        let mut out = vec![0.0f32; n * d];
        let g32 = seconds(|| drop(gpu32.infer_batch(&xs, &mut out).unwrap()));
        let g16 = seconds(|| drop(gpu16.infer_batch(&xs, &mut out).unwrap()));
        let cpu = seconds(|| drop(layer.infer_batch(&xs, &mut out, threads).unwrap()));
        println!("{n:>6} {:>14.0} {:>14.0} {:>16.0}", n as f64 / g32, n as f64 / g16, n as f64 / cpu);
    }
    Ok(())
}
