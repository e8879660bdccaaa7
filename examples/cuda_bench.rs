//! Tokens per second on the GPU beside the CPU, f32 and f16 weights:
//!
//! - a Mixtral-style layer (width 1024, 8 SwiGLU experts of 2048, top-2) at
//!   1, 16, 256 and 4096 tokens, beside the CPU batched path;
//! - a whole Mixtral-style decoder (hidden 1024, 4 layers of 8 experts of
//!   2048, top-2, 16 heads over 4 KV heads, vocabulary 8192): prefill of
//!   128-token prompts and decoding, 1, 16 and 64 sequences at once, beside
//!   the CPU decoder (prefill batched, decode a step a token, every core).
//!
//! Needs `--features cuda` and a GPU; says why and exits 0 without one.
//! `--save-layer FILE` also writes the layer's weights as safetensors under
//! `MixtralSparseMoeBlock`'s names, for `tools/torch_moe_bench.py` (PyTorch
//! eager on the same weights).
//!
//! `--emulator` runs the same program on the CPU emulator of the kernels
//! at toy sizes and batches: the figures mean nothing, but every step the
//! GPU run takes is exercised (CI runs it).
//!
//! ```text
//! cargo run --release --features cuda --example cuda_bench [-- --emulator] [--save-layer layer.safetensors]
//! ```

use std::time::Instant;

use micromoe::Rule;
use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::cuda::{CudaDecoder, CudaMoe, Emulator, Precision, Sequence, Target, available};
use micromoe::format::layout::decoder::{MODEL_LEVEL, role as drole};
use micromoe::format::layout::{LAYER_LEVEL, part, role};
use micromoe::format::write::AlignedBytes;
use micromoe::format::{Key, LayerDtype};
use micromoe::kernels::Activation;
use micromoe::model::write::DecoderSpec;
use micromoe::model::{Config, Decoder, LayerConfig};

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
    let args: Vec<String> = std::env::args().collect();
    let emulated = args.iter().any(|a| a == "--emulator");
    let save = args.iter().position(|a| a == "--save-layer").map(|i| args.get(i + 1).cloned());
    let save = match save {
        Some(None) => return Err("--save-layer needs a file".into()),
        Some(Some(f)) => Some(f),
        None => None,
    };
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
    if let Some(path) = &save {
        save_layer(&moe, path)?;
        println!("layer weights: {path}");
    }
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
    println!();
    decoder_bench(target, emulated)
}

/// The layer's weights under `MixtralSparseMoeBlock`'s state-dict names.
fn save_layer(moe: &MoeBuf<f32>, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    use safetensors::{Dtype, tensor::TensorView};
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut put = |name: String, l: &LinearBuf<f32>| {
        let bytes = l.weights.iter().flat_map(|v| v.to_le_bytes()).collect();
        named.push((name, vec![l.rows, l.cols], bytes));
    };
    put("gate.weight".into(), &moe.gate);
    for (e, x) in moe.experts.iter().enumerate() {
        let Some(gate) = &x.gate else { return Err("not a SwiGLU expert".into()) };
        put(format!("experts.{e}.w1.weight"), gate);
        put(format!("experts.{e}.w3.weight"), &x.up);
        put(format!("experts.{e}.w2.weight"), &x.down);
    }
    let views: Vec<(String, TensorView<'_>)> = named
        .iter()
        .map(|(n, shape, b)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, std::path::Path::new(path))?;
    Ok(())
}

/// Shapes of the decoder benchmark.
struct Shapes {
    hidden: usize,
    inner: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    prompt: usize,
    steps: usize,
    batches: &'static [usize],
}

/// A Mixtral-style decoder of random weights, stored as `dtype`.
fn decoder_file(s: &Shapes, dtype: LayerDtype) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let head_dim = s.hidden / s.heads;
    let config = Config {
        vocab: s.vocab,
        hidden: s.hidden,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim,
        context: s.prompt + 8 * s.steps,
        rope_theta: 1e6,
        rms_eps: 1e-5,
        tied: false,
        qkv_bias: false,
        kv_f16: false,
        layers: s.layers,
    };
    let layer = LayerConfig {
        experts: E,
        k: 2,
        hidden: s.inner,
        shared_hidden: 0,
        normalize: true,
        shared_gate: false,
    };
    let mut spec = DecoderSpec::new(config, vec![layer; s.layers]);
    let key = |layer: u16, expert: u16, role: u8| Key { layer, expert, role, part: part::WEIGHT };
    let mut seed = 17;
    let mut put = |spec: &mut DecoderSpec, k: Key, rows: usize, cols: usize, dtype: LayerDtype| {
        spec.put(k, rows, cols, &values(rows * cols, &mut seed), dtype);
    };
    let (h, kvd) = (s.hidden, s.kv_heads * head_dim);
    put(&mut spec, key(MODEL_LEVEL, LAYER_LEVEL, drole::EMBED), s.vocab, h, dtype);
    put(&mut spec, key(MODEL_LEVEL, LAYER_LEVEL, drole::LM_HEAD), s.vocab, h, dtype);
    let ones = vec![1.0f32; h];
    spec.put(key(MODEL_LEVEL, LAYER_LEVEL, drole::FINAL_NORM), h, 1, &ones, LayerDtype::F32);
    for l in 0..s.layers as u16 {
        let at = |r| key(l, LAYER_LEVEL, r);
        for (r, rows, cols) in [(drole::Q, h, h), (drole::K, kvd, h), (drole::V, kvd, h), (drole::O, h, h)] {
            put(&mut spec, at(r), rows, cols, dtype);
        }
        put(&mut spec, at(role::GATE), E, h, LayerDtype::F32);
        for e in 0..E as u16 {
            put(&mut spec, key(l, e, role::GATE_PROJ), s.inner, h, dtype);
            put(&mut spec, key(l, e, role::UP), s.inner, h, dtype);
            put(&mut spec, key(l, e, role::DOWN), h, s.inner, dtype);
        }
        spec.put(at(drole::ATTN_NORM), h, 1, &ones, LayerDtype::F32);
        spec.put(at(drole::FFN_NORM), h, 1, &ones, LayerDtype::F32);
    }
    Ok(spec.write()?)
}

fn decoder_bench(target: Target<'_>, emulated: bool) -> Result<(), Box<dyn std::error::Error>> {
    let s = if emulated {
        Shapes {
            hidden: 64,
            inner: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 256,
            prompt: 8,
            steps: 2,
            batches: &[1, 4],
        }
    } else {
        Shapes {
            hidden: 1024,
            inner: 2048,
            layers: 4,
            heads: 16,
            kv_heads: 4,
            vocab: 8192,
            prompt: 128,
            steps: 8,
            batches: &[1, 16, 64],
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on = if emulated { "emulator" } else { "GPU" };
    println!(
        "Mixtral-style decoder: hidden {}, {} layers of {E} experts of {} (top-2), {} heads over {} KV heads, \
         vocabulary {}; {}-token prompts; tokens/s",
        s.hidden, s.layers, s.inner, s.heads, s.kv_heads, s.vocab, s.prompt
    );
    println!("{:>10} {:>9} {:>12} {:>12}", "weights", "sequences", "prefill", "decode");
    for (name, dtype) in [("f32", LayerDtype::F32), ("f16", LayerDtype::F16)] {
        let bytes = AlignedBytes::from(&decoder_file(&s, dtype)?[..]);
        let dec = Decoder::parse(&bytes)?;
        let max = s.batches.iter().copied().max().unwrap_or(1);
        let gpu = CudaDecoder::on(target, &dec, max)?;
        let mut seed = 99u64;
        let mut tokens = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (seed >> 33) as u32 % s.vocab as u32
                })
                .collect()
        };
        for &b in s.batches {
            let mut seqs: Vec<Sequence> = (0..b).map(|_| gpu.sequence()).collect::<Result<_, _>>()?;
            let prompts: Vec<Vec<u32>> = (0..b).map(|_| tokens(s.prompt)).collect();
            let mut logits = vec![0.0f32; b * s.vocab];
            let prefill = seconds(|| {
                seqs.iter_mut().for_each(Sequence::reset);
                let mut batch: Vec<(&mut Sequence, &[u32])> =
                    seqs.iter_mut().zip(&prompts).map(|(q, p)| (q, &p[..])).collect();
                gpu.forward(&mut batch, &mut logits, |_, _, _| {}).unwrap();
            });
            let next = tokens(b);
            let decode = seconds(|| {
                for _ in 0..s.steps {
                    gpu.step_batch(&mut seqs, &next, &mut logits).unwrap();
                }
            });
            let (p, d) = ((b * s.prompt) as f64 / prefill, (b * s.steps) as f64 / decode);
            println!("{:>10} {b:>9} {p:>12.0} {d:>12.0}", format!("{on} {name}"));
        }
        // The CPU: a prompt as one batch, then a step a token (a sequence at a time).
        let cpu = dec.with_threads(threads);
        let mut buf = vec![0u8; cpu.state_bytes()];
        let mut state = cpu.state(&mut buf)?;
        let prompt = tokens(s.prompt);
        let mut logits = vec![0.0f32; s.vocab];
        let prefill = seconds(|| {
            state.reset();
            cpu.prefill(&mut state, &prompt, &mut logits, |_, _, _| {}).unwrap();
        });
        let decode = seconds(|| {
            for t in 0..s.steps as u32 {
                cpu.step(&mut state, t, &mut logits, |_, _| {}).unwrap();
            }
        });
        let (p, d) = (s.prompt as f64 / prefill, s.steps as f64 / decode);
        println!("{:>10} {:>9} {p:>12.0} {d:>12.0}", format!("CPU {name}"), format!("1 ({threads} thr)"));
    }
    Ok(())
}
