//! One Mixtral-style MoE layer (64 -> 8 experts of SwiGLU 128 -> 64, top-2)
//! with random weights, run in every numeric type micromoe has: f32, f16,
//! int8 and Q15. Prints, per type, weight bytes, scratch bytes, agreement of
//! expert choices with f32 and the output error against f32, then expert
//! usage and the work done against the dense equivalent.
//!
//! ```text
//! cargo run --release --example moe_layer [-- --json]
//! ```

use micromoe::build::QMoeBuf;
use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::kernels::{Activation, IntKernel};
use micromoe::quant::f16;
use micromoe::{Rule, Stats};

const D: usize = 64;
const HIDDEN: usize = 128;
const EXPERTS: usize = 8;
const K: usize = 2;
const TOKENS: usize = 512;

/// Deterministic normal-ish numbers (sum of uniforms), so runs repeat.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self, std: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
        s * std * (3.0f32).sqrt()
    }

    fn vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(std)).collect()
    }
}

fn model(rng: &mut Rng) -> MoeBuf<f32> {
    let (si, sh) = (1.0 / (D as f32).sqrt(), 1.0 / (HIDDEN as f32).sqrt());
    let experts = (0..EXPERTS)
        .map(|_| {
            let w1 = LinearBuf::new(rng.vec(HIDDEN * D, si), None, HIDDEN, D);
            let w3 = LinearBuf::new(rng.vec(HIDDEN * D, si), None, HIDDEN, D);
            let w2 = LinearBuf::new(rng.vec(D * HIDDEN, sh), None, D, HIDDEN);
            ExpertBuf::gated(w1, w3, w2, Activation::Silu)
        })
        .collect();
    let gate = LinearBuf::new(rng.vec(EXPERTS * D, 3.0 * si), None, EXPERTS, D);
    MoeBuf::new(gate, experts, Rule::mixtral(EXPERTS, K))
}

/// One token's output and chosen experts.
type Token = (Vec<f32>, Vec<u16>);

struct Row {
    dtype: &'static str,
    weight_bytes: usize,
    scratch_bytes: usize,
    agreement: f64,
    max_err: f64,
    rms_err: f64,
}

fn compare(reference: &[Token], got: &[Token]) -> (f64, f64, f64) {
    let (mut same, mut max, mut sq, mut n) = (0usize, 0f64, 0f64, 0usize);
    let scale = reference.iter().flat_map(|r| &r.0).fold(0f64, |m, v| m.max(v.abs() as f64));
    for (r, g) in reference.iter().zip(got) {
        let mut a = r.1.clone();
        let mut b = g.1.clone();
        a.sort();
        b.sort();
        if a != b {
            // A flipped choice near a routing tie: a different function, not an error to average.
            continue;
        }
        same += 1;
        for (x, y) in r.0.iter().zip(&g.0) {
            let e = (x - y).abs() as f64 / scale;
            max = max.max(e);
            sq += e * e;
            n += 1;
        }
    }
    (same as f64 / reference.len() as f64, max, (sq / n as f64).sqrt())
}

fn run_float<W: micromoe::kernels::FloatWeight>(
    m: &MoeBuf<W>,
    xs: &[f32],
    stats: &mut Stats<EXPERTS>,
) -> (usize, Vec<Token>) {
    let views = m.expert_views().expect("valid experts");
    let layer = m.layer(&views).expect("valid layer");
    let mut scratch = vec![0u8; layer.scratch_bytes()];
    let out = xs
        .chunks_exact(D)
        .map(|x| {
            let mut y = vec![0.0; D];
            let sel = layer.infer_with_stats(x, &mut y, &mut scratch, stats).expect("inference");
            (y, sel.iter().map(|c| c.expert).collect())
        })
        .collect();
    (layer.scratch_bytes(), out)
}

fn run_int<A: IntKernel>(q: &QMoeBuf<A>, xs: &[f32]) -> (usize, usize, Vec<Token>) {
    let views = q.expert_views().expect("valid experts");
    let layer = q.layer(&views).expect("valid layer");
    let mut scratch = vec![0u8; layer.scratch_bytes()];
    let (mut xq, mut yq) = (vec![A::default(); D], vec![A::default(); D]);
    let out = xs
        .chunks_exact(D)
        .map(|x| {
            q.input.quantize_slice(x, &mut xq).expect("shape");
            let sel = layer.infer(&xq, &mut yq, &mut scratch).expect("inference");
            let mut y = vec![0.0; D];
            q.output.dequantize_slice(&yq, &mut y).expect("shape");
            (y, sel.iter().map(|c| c.expert).collect())
        })
        .collect();
    let bias = size_of::<A::Bias>();
    let lin = |l: &micromoe::build::QLinearBuf<A>| {
        l.weights.len() + l.multipliers.len() * 8 + l.bias.as_ref().map_or(0, |b| b.len() * bias)
    };
    let expert = |e: &micromoe::build::QExpertBuf<A>| {
        lin(&e.up)
            + lin(&e.down)
            + e.gate.as_ref().map_or(0, |g| lin(&g.0))
            + e.lut.as_ref().map_or(0, |t| t.len() * size_of::<A>())
    };
    let weight_bytes = lin(&q.gate) + q.experts.iter().map(expert).sum::<usize>();
    (weight_bytes, layer.scratch_bytes(), out)
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let mut rng = Rng(2026);
    let f32_model = model(&mut rng);
    let xs = rng.vec(TOKENS * D, 1.0);

    let mut stats = Stats::<EXPERTS>::new();
    let (scratch, reference) = run_float(&f32_model, &xs, &mut stats);
    let mut rows = vec![Row {
        dtype: "f32",
        weight_bytes: f32_model.weight_bytes(),
        scratch_bytes: scratch,
        agreement: 1.0,
        max_err: 0.0,
        rms_err: 0.0,
    }];

    let f16_model = f32_model.convert(f16::from_f32);
    let (scratch, out) = run_float(&f16_model, &xs, &mut Stats::new());
    let (agreement, max_err, rms_err) = compare(&reference, &out);
    rows.push(Row {
        dtype: "f16",
        weight_bytes: f16_model.weight_bytes(),
        scratch_bytes: scratch,
        agreement,
        max_err,
        rms_err,
    });

    let views = f32_model.expert_views().expect("valid experts");
    let float_layer = f32_model.layer(&views).expect("valid layer");
    let q8 = QMoeBuf::<i8>::quantize(&float_layer, &xs).expect("quantizes");
    let (weight_bytes, scratch, out) = run_int(&q8, &xs);
    let (agreement, max_err, rms_err) = compare(&reference, &out);
    rows.push(Row { dtype: "int8", weight_bytes, scratch_bytes: scratch, agreement, max_err, rms_err });
    let q15 = QMoeBuf::<i16>::quantize(&float_layer, &xs).expect("quantizes");
    let (weight_bytes, scratch, out) = run_int(&q15, &xs);
    let (agreement, max_err, rms_err) = compare(&reference, &out);
    rows.push(Row { dtype: "q15", weight_bytes, scratch_bytes: scratch, agreement, max_err, rms_err });

    let per_token = |v: u64| v as f64 / stats.tokens as f64;
    if json {
        let dtypes: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "\"{}\":{{\"weight_bytes\":{},\"scratch_bytes\":{},\"agreement\":{:.4},\"max_err\":{:.3e},\"rms_err\":{:.3e}}}",
                    r.dtype, r.weight_bytes, r.scratch_bytes, r.agreement, r.max_err, r.rms_err
                )
            })
            .collect();
        let counts: Vec<String> = stats.counts.iter().map(u32::to_string).collect();
        println!(
            "{{\"tokens\":{TOKENS},\"dtypes\":{{{}}},\"expert_counts\":[{}],\"macs_active\":{},\"macs_dense\":{}}}",
            dtypes.join(","),
            counts.join(","),
            per_token(stats.macs),
            per_token(stats.macs_dense)
        );
        return;
    }
    println!(
        "Mixtral-style layer: {D} -> {EXPERTS} SwiGLU experts ({HIDDEN} hidden), top-{K}, {TOKENS} tokens\n"
    );
    println!("error columns: over tokens that chose the same experts as f32, relative to max |y|\n");
    println!("dtype  weight bytes  scratch bytes  same experts as f32  max |err|  rms err");
    for r in &rows {
        println!(
            "{:<6} {:>12}  {:>13}  {:>18.1}%  {:>9.2e}  {:>7.2e}",
            r.dtype,
            r.weight_bytes,
            r.scratch_bytes,
            100.0 * r.agreement,
            r.max_err,
            r.rms_err
        );
    }
    println!("\nexpert usage (f32): {:?}", stats.counts);
    println!(
        "MACs per token: {:.0} active vs {:.0} dense ({:.2}x fewer)",
        per_token(stats.macs),
        per_token(stats.macs_dense),
        stats.macs_dense as f64 / stats.macs as f64
    );
}
