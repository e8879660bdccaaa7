//! One Mixtral-style MoE layer (8 SwiGLU experts of 512, top-2, width 256,
//! the layer of `benches/moe.rs`) in micromoe and in candle 0.11 on the CPU,
//! on the same weights: the outputs are compared, then one token at a time
//! is timed (median of 2,000 runs after 200 warm-up runs). candle routes the
//! way its own Mixtral does: gate logits as a tensor, softmax and top-k in
//! host Rust, then each chosen expert's matmuls on tensors.
//!
//! ```text
//! cd benches/candle && cargo run --release                        # candle on all cores
//! cd benches/candle && RAYON_NUM_THREADS=1 cargo run --release    # candle on one
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor};
use micromoe::Rule;
use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::kernels::Activation;

const D: usize = 256;
const H: usize = 512;
const E: usize = 8;
const K: usize = 2;

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

struct CandleExpert {
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..200 {
        f();
    }
    median(
        (0..2000)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = Rng(7);
    let gate = rng.vec(E * D);
    let experts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        (0..E).map(|_| (rng.vec(H * D), rng.vec(H * D), rng.vec(D * H))).collect();
    let x = rng.vec(D);

    // micromoe
    let lin = |w: &Vec<f32>, r, c| LinearBuf::new(w.clone(), None, r, c);
    let bufs: Vec<ExpertBuf<f32>> = experts
        .iter()
        .map(|(w1, w3, w2)| ExpertBuf::gated(lin(w1, H, D), lin(w3, H, D), lin(w2, D, H), Activation::Silu))
        .collect();
    let moe = MoeBuf::new(lin(&gate, E, D), bufs, Rule::mixtral(E, K));
    let views = moe.expert_views()?;
    let layer = moe.layer(&views)?;
    let mut scratch = vec![0u8; layer.scratch_bytes()];
    let mut y = vec![0.0f32; D];

    // candle, the same weights
    let dev = Device::Cpu;
    let t = |w: &Vec<f32>, r: usize, c: usize| Tensor::from_vec(w.clone(), (r, c), &dev);
    let gate_t = t(&gate, E, D)?.t()?.contiguous()?;
    let cexperts: Vec<CandleExpert> = experts
        .iter()
        .map(|(w1, w3, w2)| {
            Ok(CandleExpert {
                w1: t(w1, H, D)?.t()?.contiguous()?,
                w3: t(w3, H, D)?.t()?.contiguous()?,
                w2: t(w2, D, H)?.t()?.contiguous()?,
            })
        })
        .collect::<candle_core::Result<_>>()?;
    let xt = Tensor::from_vec(x.clone(), (1, D), &dev)?;
    let candle_layer = |xt: &Tensor| -> candle_core::Result<Vec<f32>> {
        let logits: Vec<f32> = xt.matmul(&gate_t)?.flatten_all()?.to_vec1()?;
        let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v));
        let p: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
        let mut order: Vec<usize> = (0..E).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let chosen = &order[..K];
        let total: f32 = chosen.iter().map(|&e| p[e]).sum();
        let mut out: Option<Tensor> = None;
        for &e in chosen {
            let ex = &cexperts[e];
            let h = (xt.matmul(&ex.w1)?.silu()? * xt.matmul(&ex.w3)?)?;
            let ye = (h.matmul(&ex.w2)? * (p[e] / total) as f64)?;
            out = Some(match out {
                Some(o) => (o + ye)?,
                None => ye,
            });
        }
        match out {
            Some(o) => o.flatten_all()?.to_vec1(),
            None => Ok(vec![0.0; D]),
        }
    };

    layer.infer(&x, &mut y, &mut scratch)?;
    let theirs = candle_layer(&xt)?;
    let diff = y.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    println!("same weights, one token: max |micromoe - candle| = {diff:.2e} (largest output {scale:.2e})");

    let ours = time(|| {
        layer.infer(std::hint::black_box(&x), &mut y, &mut scratch).unwrap();
    });
    let candle = time(|| {
        std::hint::black_box(candle_layer(std::hint::black_box(&xt)).unwrap());
    });
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    println!("Mixtral-style layer (8 experts x 512, top-2, width 256), one token:");
    println!("  micromoe f32: {:8.1} us (one thread)", ours * 1e6);
    println!("  candle 0.11:  {:8.1} us (RAYON_NUM_THREADS={threads})", candle * 1e6);
    println!("  ratio:        {:8.2}x", candle / ours);
    Ok(())
}
