//! Tokens per second of a Mixtral-style layer (width 1024, 8 SwiGLU experts
//! of 2048, top-2) on the GPU beside the CPU batched path, at 1, 16, 256 and
//! 4096 tokens, f32 and f16 weights. Needs `--features cuda` and a GPU; says
//! why and exits 0 without one.
//!
//! ```text
//! cargo run --release --features cuda --example cuda_bench
//! ```

use std::time::Instant;

use micromoe::Rule;
use micromoe::cuda::{CudaMoe, Precision, available};
use micromoe::kernels::Activation;
use micromoe::moe::owned::{ExpertBuf, LinearBuf, MoeBuf};

const D: usize = 1024;
const H: usize = 2048;
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
    if let Err(e) = available() {
        println!("cuda_bench: skipped ({e})");
        return Ok(());
    }
    let mut seed = 3;
    let lin = |r, c, s: &mut u64| LinearBuf::new(values(r * c, s), None, r, c);
    let experts: Vec<ExpertBuf<f32>> = (0..E)
        .map(|_| {
            ExpertBuf::gated(
                lin(H, D, &mut seed),
                lin(H, D, &mut seed),
                lin(D, H, &mut seed),
                Activation::Silu,
            )
        })
        .collect();
    let moe = MoeBuf::new(lin(E, D, &mut seed), experts, Rule::mixtral(E, 2));
    let views = moe.expert_views()?;
    let layer = moe.layer(&views)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpu32 = CudaMoe::new(&layer, Precision::F32)?;
    let gpu16 = CudaMoe::new(&layer, Precision::F16)?;
    println!("Mixtral-style layer: width {D}, {E} SwiGLU experts of {H}, top-2; tokens/s");
    println!(
        "{:>6} {:>14} {:>14} {:>16}",
        "tokens",
        "GPU f32",
        "GPU f16",
        format!("CPU f32 ({threads} thr)")
    );
    for n in [1usize, 16, 256, 4096] {
        let xs = values(n * D, &mut seed);
        let mut out = vec![0.0f32; n * D];
        let g32 = seconds(|| drop(gpu32.infer_batch(&xs, &mut out).unwrap()));
        let g16 = seconds(|| drop(gpu16.infer_batch(&xs, &mut out).unwrap()));
        let cpu = seconds(|| drop(layer.infer_batch(&xs, &mut out, threads).unwrap()));
        println!("{n:>6} {:>14.0} {:>14.0} {:>16.0}", n as f64 / g32, n as f64 / g16, n as f64 / cpu);
    }
    Ok(())
}
