//! Host benchmarks (criterion): `cargo bench`.
//!
//! - `moe_vs_dense`: one token through a Mixtral-style layer (8 SwiGLU
//!   experts of 512, top-2, width 256) against a dense SwiGLU FFN with the
//!   same total parameters (hidden 8 x 512); the ideal ratio is 4x.
//! - `matvec`: f32 and int8 matrix-vector products (GFLOP/s = 2 x MACs / s),
//!   beside `f32_sequential`, a plain one-sum-per-row loop (what the kernel
//!   was before it kept eight lanes), at sizes from L1-resident to 64 MB.
//! - `batched`: tokens/s of `infer_batch` at 1, 16 and 256 tokens.
//! - `peak`: this machine's limits for comparison: f32 multiply + add
//!   throughput on registers (separate, as the kernels do; and fused, with
//!   FMA) and read bandwidth over 256 MB.
//!
//! Benchmarks report; tests never assert times.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use micromoe::Rule;

use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::kernels::{Activation, matmul, matvec, matvec_i8, matvec_q15};
use std::hint::black_box;

const D: usize = 256;
const H: usize = 512;
const E: usize = 8;

struct Rng(u64);

impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 =
                    self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    }
}

fn expert(rng: &mut Rng, hidden: usize) -> ExpertBuf<f32> {
    ExpertBuf::gated(
        LinearBuf::new(rng.vec(hidden * D), None, hidden, D),
        LinearBuf::new(rng.vec(hidden * D), None, hidden, D),
        LinearBuf::new(rng.vec(D * hidden), None, D, hidden),
        Activation::Silu,
    )
}

/// The Mixtral-style layer the benchmarks run.
fn mixtral(rng: &mut Rng) -> MoeBuf<f32> {
    let gate = LinearBuf::new(rng.vec(E * D), None, E, D);
    MoeBuf::new(gate, (0..E).map(|_| expert(rng, H)).collect(), Rule::mixtral(E, 2))
}

fn moe_vs_dense(c: &mut Criterion) {
    let mut rng = Rng(7);
    let moe = mixtral(&mut rng);
    let views = moe.expert_views().unwrap();
    let layer = moe.layer(&views).unwrap();
    let dense = expert(&mut rng, E * H);
    let dense_view = dense.view().unwrap();
    let x = rng.vec(D);
    let mut y = vec![0.0f32; D];
    let mut scratch = vec![0u8; layer.scratch_bytes()];
    let mut hidden = vec![0.0f32; 2 * E * H];
    let mut g = c.benchmark_group("moe_vs_dense");
    g.bench_function("moe_top2_of_8", |b| {
        b.iter(|| layer.infer(black_box(&x), &mut y, &mut scratch).unwrap())
    });
    g.bench_function("dense_same_params", |b| {
        b.iter(|| dense_view.forward(black_box(&x), &mut y, &mut hidden))
    });
    g.finish();
}

fn matvecs(c: &mut Criterion) {
    let mut rng = Rng(9);
    let mut g = c.benchmark_group("matvec");
    for (rows, cols) in [(64, 64), (256, 512), (1024, 1024), (4096, 4096)] {
        let w = rng.vec(rows * cols);
        let x = rng.vec(cols);
        let mut y = vec![0.0f32; rows];
        g.throughput(Throughput::Elements(2 * (rows * cols) as u64));
        g.bench_with_input(BenchmarkId::new("f32", format!("{rows}x{cols}")), &(), |b, _| {
            b.iter(|| matvec(black_box(&w), None, black_box(&x), &mut y))
        });
        let w16: Vec<micromoe::quant::f16> = w.iter().map(|&v| micromoe::quant::f16::from_f32(v)).collect();
        g.bench_with_input(BenchmarkId::new("f16", format!("{rows}x{cols}")), &(), |b, _| {
            b.iter(|| matvec(black_box(&w16), None, black_box(&x), &mut y))
        });
        g.bench_with_input(BenchmarkId::new("f32_sequential", format!("{rows}x{cols}")), &(), |b, _| {
            b.iter(|| {
                for (yo, row) in y.iter_mut().zip(black_box(&w).chunks_exact(cols)) {
                    *yo = row.iter().zip(black_box(&x)).map(|(a, b)| a * b).sum();
                }
            })
        });
        let tokens = 16;
        let xs = rng.vec(tokens * cols);
        let mut ys = vec![0.0f32; tokens * rows];
        g.throughput(Throughput::Elements(2 * (tokens * rows * cols) as u64));
        g.bench_with_input(BenchmarkId::new("f32_16_tokens", format!("{rows}x{cols}")), &(), |b, _| {
            b.iter(|| matmul(black_box(&w), None, black_box(&xs), cols, &mut ys))
        });
        g.throughput(Throughput::Elements(2 * (rows * cols) as u64));
        let wq: Vec<i8> = w.iter().map(|v| (v * 1000.0) as i8).collect();
        let xq: Vec<i8> = x.iter().map(|v| (v * 1000.0) as i8).collect();
        let (m, s) = (vec![1 << 30; rows], vec![-8; rows]);
        let mut yq = vec![0i8; rows];
        g.bench_with_input(BenchmarkId::new("int8", format!("{rows}x{cols}")), &(), |b, _| {
            b.iter(|| matvec_i8(black_box(&wq), None, &m, &s, black_box(&xq), 3, -2, &mut yq))
        });
        let x15: Vec<i16> = x.iter().map(|v| (v * 30_000.0) as i16).collect();
        let mut y15 = vec![0i16; rows];
        g.bench_with_input(BenchmarkId::new("q15", format!("{rows}x{cols}")), &(), |b, _| {
            b.iter(|| matvec_q15(black_box(&wq), None, &m, &s, black_box(&x15), &mut y15))
        });
    }
    g.finish();
}

fn batched(c: &mut Criterion) {
    let mut rng = Rng(11);
    let moe = mixtral(&mut rng);
    let views = moe.expert_views().unwrap();
    let layer = moe.layer(&views).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("batched");
    for n in [1usize, 16, 256] {
        let xs = rng.vec(n * D);
        let mut out = vec![0.0f32; n * D];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("tokens", n), &n, |b, _| {
            b.iter(|| layer.infer_batch(black_box(&xs), &mut out, threads).unwrap())
        });
    }
    g.finish();
}

/// Eight independent 8-wide chains of multiply then add on registers.
#[inline(always)]
fn mul_add_chains(a: &mut [[f32; 8]; 8], m: f32, c: f32, fused: bool) {
    for _ in 0..1024 {
        for lane in a.iter_mut() {
            for v in lane.iter_mut() {
                *v = if fused { v.mul_add(m, c) } else { *v * m + c };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn mul_add_chains_avx2(a: &mut [[f32; 8]; 8], m: f32, c: f32, fused: bool) {
    mul_add_chains(a, m, c, fused)
}

fn peak(c: &mut Criterion) {
    let mut g = c.benchmark_group("peak");
    // 1024 x 64 multiply-adds per call, 2 flops each.
    g.throughput(Throughput::Elements(2 * 1024 * 64));
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        for (name, fused) in [("mul_then_add_avx2", false), ("fma_avx2", true)] {
            g.bench_function(name, |b| {
                let mut a = [[1.0f32; 8]; 8];
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                b.iter(|| unsafe { mul_add_chains_avx2(&mut a, black_box(0.999), black_box(1e-3), fused) });
                black_box(a);
            });
        }
    }
    let big = vec![1.0f32; 64 << 20];
    g.throughput(Throughput::Bytes((big.len() * 4) as u64));
    g.bench_function("read_256MB", |b| {
        b.iter(|| {
            let mut l = [0.0f32; 16];
            for c in black_box(&big).chunks_exact(16) {
                for i in 0..16 {
                    l[i] += c[i];
                }
            }
            black_box(l)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = moe_vs_dense, matvecs, batched, peak
}
criterion_main!(benches);
