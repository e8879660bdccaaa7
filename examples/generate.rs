//! Streams text from the tiny MoE language model (trained by
//! `tools/train_tinylm.py` on the Python reference topics, bytes as tokens,
//! converted by `micromoe convert`).
//!
//! ```text
//! cargo run --release --example generate -- "The "
//! cargo run --release --example generate -- "A class " --tokens 300 --temperature 0.8 --top-p 0.9 --seed 7
//! cargo run --release --example generate -- "def " --model /tmp/tinylm_f32.moe
//! ```
//!
//! Greedy by default. When the context (128 bytes, the training window)
//! is full, the model restarts from the last 64 bytes. The model is int8 (weights per row, activations per
//! product) with an f16 KV cache; the same tokens come out of the
//! mps2-an386 firmware in `boards/`.

use std::io::Write;
use std::time::Instant;

use micromoe::format::write::AlignedBytes;
use micromoe::model::{Decoder, Sampler};

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tinylm/tinylm_int8.moe");

struct Args {
    prompt: String,
    model: String,
    tokens: usize,
    sampler: Sampler,
}

fn args() -> Result<Args, String> {
    let mut a =
        Args { prompt: "The ".into(), model: DEFAULT_MODEL.into(), tokens: 200, sampler: Sampler::greedy() };
    let mut it = std::env::args().skip(1);
    let (mut temperature, mut top_p, mut seed) = (0.0f32, 1.0f32, 0u64);
    let mut prompt = None;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--model" => a.model = value("--model")?,
            "--tokens" => a.tokens = value("--tokens")?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--temperature" => {
                temperature = value("--temperature")?.parse().map_err(|e| format!("--temperature: {e}"))?
            }
            "--top-p" => top_p = value("--top-p")?.parse().map_err(|e| format!("--top-p: {e}"))?,
            "--seed" => seed = value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            s => prompt = Some(s.to_string()),
        }
    }
    if let Some(p) = prompt {
        a.prompt = p;
    }
    a.sampler = Sampler::new(temperature, top_p, seed);
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let bytes = std::fs::read(&args.model).map_err(|e| format!("{}: {e}", args.model))?;
    let bytes = AlignedBytes::from(&bytes[..]);
    let dec = Decoder::parse(&bytes)?;
    let vocab = dec.config().vocab;
    if vocab != 128 {
        return Err(
            format!("{}: vocabulary {vocab}, this example speaks ASCII bytes (128)", args.model).into()
        );
    }
    // Tokens are ASCII bytes; anything else becomes '?'.
    let prompt: Vec<u32> =
        args.prompt.chars().map(|c| if c.is_ascii() { c as u32 } else { b'?' as u32 }).collect();
    let context = dec.config().context;
    if prompt.is_empty() || prompt.len() > context {
        return Err(format!("the prompt must have 1 to {context} characters").into());
    }
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf)?;
    let mut logits = vec![0.0f32; vocab];
    let mut sampler = args.sampler;
    let mut uses = vec![vec![0usize; 8]; dec.config().layers];
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    let start = Instant::now();
    let mut fed = 0;
    let mut next = 0;
    // The prompt in one batch per layer (the same logits as token by token).
    if !prompt.is_empty() {
        dec.prefill(&mut state, &prompt, &mut logits, |_, _, _| {})?;
        fed += prompt.len();
        next = state.sample(&mut sampler, &mut logits)?;
    }
    let mut history = prompt.clone();
    for _ in 0..args.tokens {
        write!(out, "{}", char::from(next as u8))?;
        out.flush()?;
        history.push(next);
        if state.pos() == context {
            // The cache is full: start again from the last half of the text
            // (positions beyond the context were never trained).
            state.reset();
            let keep = history.len() - context / 2;
            let again = &history[keep..history.len() - 1];
            if !again.is_empty() {
                dec.prefill(&mut state, again, &mut logits, |_, _, _| {})?;
                fed += again.len();
            }
        }
        dec.step(&mut state, next, &mut logits, |l, sel| {
            for c in sel {
                if let Some(u) = uses[l].get_mut(c.expert as usize) {
                    *u += 1;
                }
            }
        })?;
        fed += 1;
        next = state.sample(&mut sampler, &mut logits)?;
    }
    writeln!(out)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{fed} tokens in {:.1} ms ({:.0} tokens/s); state {} bytes, model {} bytes",
        secs * 1e3,
        fed as f64 / secs,
        dec.state_bytes(),
        dec.bytes().len()
    );
    for (l, u) in uses.iter().enumerate() {
        let n = dec.layer_config(l)?.experts;
        eprintln!("layer {l} expert use: {:?}", &u[..n.min(u.len())]);
    }
    Ok(())
}
