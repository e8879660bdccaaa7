//! Host decoding speed of the decoder (`model::Decoder`) on random
//! Mixtral-style models of realistic width, one core: tokens/s for a
//! 64-token prompt (`Decoder::prefill`, one batch per layer; `--sequential`:
//! `Decoder::step` token by token) and for 64 decoded tokens, for f32, f16
//! and int8 weights (one scale a row, and `i8g32`: one per 32 columns,
//! `micromoe convert --group 32`).
//!
//! ```text
//! cargo run --release --example decode_bench                 # hidden 512 and 1024
//! cargo run --release --example decode_bench -- 512 --runs 5 # one width
//! cargo run --release --example decode_bench -- 1024 --type f16 # one type
//! cargo run --release --example decode_bench -- --type i8g32    # int8, a scale per 32 columns
//! cargo run --release --example decode_bench -- --sequential    # prompt token by token
//! cargo run --release --example decode_bench -- --model m.moe   # a converted decoder
//! cargo run --release --example decode_bench -- --threads 2     # Decoder::with_threads(2)
//! cargo run --release --features fast-float --example decode_bench # FMA products (not the MCU's bits)
//! taskset -c 0 cargo run --release --example decode_bench    # pinned, as README's figures
//! cargo run --release --example decode_bench -- --prompt-only   # no decoding (for profiles)
//! ```
//!
//! The models: vocabulary 32,000 (untied head), 4 layers, 8 experts top-2
//! with an inner width of 3.5 x hidden (Mixtral's ratio), 8 query heads and
//! 2 key/value heads, f32 KV cache, weights uniform in +-1/sqrt(fan-in)
//! from a seeded generator. Each figure is the median of `--runs` runs
//! (default 3). No comparison is made here; the weights and the tokens are
//! the same every run, so two builds can be compared line by line.

use std::time::Instant;

use micromoe::format::Key;
use micromoe::format::LayerDtype;
use micromoe::format::layout::decoder::{MODEL_LEVEL, role as drole};
use micromoe::format::layout::{LAYER_LEVEL, part, role};
use micromoe::format::write::AlignedBytes;
use micromoe::model::write::DecoderSpec;
use micromoe::model::{Config, Decoder, LayerConfig};

const VOCAB: usize = 32_000;
const LAYERS: usize = 4;
const EXPERTS: usize = 8;
const TOKENS: usize = 64;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        // xorshift64*, the top 24 bits as a value in [-1, 1).
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        v as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn key(layer: u16, expert: u16, role: u8) -> Key {
    Key { layer, expert, role, part: part::WEIGHT }
}

fn model(hidden: usize, dtype: LayerDtype, group: Option<usize>) -> Vec<u8> {
    let (heads, kv_heads) = (8, 2);
    let head_dim = hidden / heads;
    let inner = hidden * 7 / 2;
    let config = Config {
        vocab: VOCAB,
        hidden,
        heads,
        kv_heads,
        head_dim,
        context: 2 * TOKENS + 1,
        rope_theta: 1e6,
        rms_eps: 1e-5,
        tied: false,
        qkv_bias: false,
        kv_f16: false,
        layers: LAYERS,
    };
    let lc = LayerConfig {
        experts: EXPERTS,
        k: 2,
        hidden: inner,
        shared_hidden: 0,
        normalize: true,
        shared_gate: false,
    };
    let mut spec = DecoderSpec::new(config, vec![lc; LAYERS]).with_int8_group(group);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ hidden as u64);
    let mut put = |spec: &mut DecoderSpec, k: Key, rows: usize, cols: usize, d: LayerDtype| {
        let a = 1.0 / (cols as f32).sqrt();
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.next() * a).collect();
        spec.put(k, rows, cols, &v, d);
    };
    put(&mut spec, key(MODEL_LEVEL, LAYER_LEVEL, drole::EMBED), VOCAB, hidden, dtype);
    put(&mut spec, key(MODEL_LEVEL, LAYER_LEVEL, drole::LM_HEAD), VOCAB, hidden, dtype);
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    for l in 0..LAYERS as u16 {
        for (r, rows, cols) in
            [(drole::Q, q, hidden), (drole::K, kv, hidden), (drole::V, kv, hidden), (drole::O, hidden, q)]
        {
            put(&mut spec, key(l, LAYER_LEVEL, r), rows, cols, dtype);
        }
        put(&mut spec, key(l, LAYER_LEVEL, role::GATE), EXPERTS, hidden, dtype);
        for e in 0..EXPERTS as u16 {
            put(&mut spec, key(l, e, role::GATE_PROJ), inner, hidden, dtype);
            put(&mut spec, key(l, e, role::UP), inner, hidden, dtype);
            put(&mut spec, key(l, e, role::DOWN), hidden, inner, dtype);
        }
    }
    let ones = vec![1.0f32; hidden];
    spec.put(key(MODEL_LEVEL, LAYER_LEVEL, drole::FINAL_NORM), hidden, 1, &ones, LayerDtype::F32);
    for l in 0..LAYERS as u16 {
        for r in [drole::ATTN_NORM, drole::FFN_NORM] {
            spec.put(key(l, LAYER_LEVEL, r), hidden, 1, &ones, LayerDtype::F32);
        }
    }
    spec.write().expect("the benchmark model writes")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Tokens/s of the prompt and of the decoded tokens (greedy; NaN when
/// `decode` is false).
fn run(decoder: &Decoder<'_>, sequential: bool, decode: bool) -> (f64, f64) {
    let mut buf = vec![0u8; decoder.state_bytes()];
    let mut state = decoder.state(&mut buf).unwrap();
    let vocab = decoder.config().vocab;
    assert!(
        decoder.config().context > 2 * TOKENS,
        "the model's context must exceed {} positions",
        2 * TOKENS
    );
    let mut logits = vec![0.0f32; vocab];
    let prompt: Vec<u32> = (0..TOKENS as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
    let t = Instant::now();
    if sequential {
        for &tok in &prompt {
            decoder.step(&mut state, tok, &mut logits, |_, _| {}).unwrap();
        }
    } else {
        decoder.prefill(&mut state, &prompt, &mut logits, |_, _, _| {}).unwrap();
    }
    let prefill = TOKENS as f64 / t.elapsed().as_secs_f64();
    if !decode {
        return (prefill, f64::NAN);
    }
    let t = Instant::now();
    for _ in 0..TOKENS {
        let next = micromoe::argmax(&logits).unwrap_or(0) as u32;
        decoder.step(&mut state, next, &mut logits, |_, _| {}).unwrap();
    }
    (prefill, TOKENS as f64 / t.elapsed().as_secs_f64())
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("decode_bench: {e}");
        std::process::exit(2);
    }
}

/// The value after a flag, parsed.
fn value<T: std::str::FromStr>(
    it: &mut impl Iterator<Item = String>,
    flag: &str,
    what: &str,
) -> Result<T, String> {
    let v = it.next().ok_or_else(|| format!("{flag} needs {what}"))?;
    v.parse().map_err(|_| format!("{flag}: {v:?} is not {what}"))
}

fn bench() -> Result<(), String> {
    let mut widths = Vec::new();
    let mut runs = 3;
    let mut only: Option<String> = None;
    let mut sequential = false;
    let mut decode = true;
    let mut threads = 1;
    let mut models: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = value(&mut it, "--runs", "a count")?,
            "--sequential" => sequential = true,
            "--prompt-only" => decode = false,
            "--threads" => threads = value(&mut it, "--threads", "a count")?,
            "--model" => models.push(value(&mut it, "--model", "a path")?),
            "--type" => only = Some(value(&mut it, "--type", "f32, f16, int8 or i8g32")?),
            w => match w.parse::<usize>() {
                // Eight heads, and `--type i8g32`'s groups of 32 in the
                // inner width (3.5x).
                Ok(h) if h > 0 && h.is_multiple_of(64) => widths.push(h),
                _ => return Err(format!("{w:?}: expected a width (a multiple of 64) or a flag")),
            },
        }
    }
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if let Some(t) = only.as_deref().filter(|t| !["f32", "f16", "int8", "i8g32"].contains(t)) {
        return Err(format!("--type {t:?}: expected f32, f16, int8 or i8g32"));
    }
    println!("width  type  prompt tok/s  decode tok/s  (median of {runs}, {TOKENS} tokens each)");
    // A converted model instead of the built-in ones (its own vocabulary and context).
    for path in &models {
        let file = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let bytes = AlignedBytes::from(&file[..]);
        let decoder = Decoder::parse(&bytes).map_err(|e| format!("{path}: {e}"))?.with_threads(threads);
        if decoder.config().context <= 2 * TOKENS {
            return Err(format!("{path}: its context must exceed {} positions", 2 * TOKENS));
        }
        let (p, d): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| run(&decoder, sequential, decode)).unzip();
        println!("{:5}  {path}  {:12.1}  {:12.1}", decoder.config().hidden, median(p), median(d));
    }
    if !models.is_empty() && widths.is_empty() {
        return Ok(());
    }
    if widths.is_empty() {
        widths = vec![512, 1024];
    }
    for &hidden in &widths {
        let types = [
            ("f32", LayerDtype::F32, None),
            ("f16", LayerDtype::F16, None),
            ("int8", LayerDtype::Int8, None),
            ("i8g32", LayerDtype::Int8, Some(32)),
        ];
        for (name, dtype, group) in types {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let bytes = AlignedBytes::from(&model(hidden, dtype, group)[..]);
            let decoder = Decoder::parse(&bytes).unwrap().with_threads(threads);
            let (p, d): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| run(&decoder, sequential, decode)).unzip();
            println!("{hidden:5}  {name:4}  {:12.1}  {:12.1}", median(p), median(d));
        }
    }
    Ok(())
}
