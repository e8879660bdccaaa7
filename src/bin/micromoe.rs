//! `micromoe`: convert checkpoints to `.moe`, describe models, run them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use micromoe::Model;
use micromoe::format::write::AlignedBytes;
use micromoe::host::{
    DecoderOptions, Dtype, HostError, convert_decoder, convert_with_progress, read_inputs, read_moe,
    summarize, summarize_decoder, zeroed,
};
use micromoe::model::Decoder;
use serde_json::json;

#[derive(Parser)]
#[command(name = "micromoe", version, about = "Sparse Mixture-of-Experts models for microcontrollers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a checkpoint directory (config.json + *.safetensors) to a .moe file.
    Convert {
        /// Checkpoint directory.
        dir: PathBuf,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Numeric type: f32, f16, int8 or q15.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Numeric type of the router gate for float models (default: --dtype).
        #[arg(long)]
        gate_dtype: Option<String>,
        /// Representative inputs for int8 / q15: safetensors with "x" (samples, input width), or JSON.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Decoders: positions the KV cache holds (default: max_position_embeddings).
        #[arg(long)]
        context: Option<usize>,
        /// Decoders: KV cache type, f32 or f16.
        #[arg(long, default_value = "f32")]
        kv_dtype: String,
        /// int8 decoders: one scale per this many columns (a multiple of 16, e.g. 32 as
        /// llama.cpp's Q8_0), inputs quantized per group too (default: one scale a row).
        #[arg(long)]
        group: Option<usize>,
    },
    /// Describe a .moe model: parameters, bytes per expert, router, flash and scratch bytes.
    Info {
        /// The model.
        model: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a .moe model on inputs and print outputs and chosen experts.
    Run {
        /// The model.
        model: PathBuf,
        /// Inputs: safetensors with "x" (samples, input width), or JSON (an array, or an array of arrays).
        #[arg(long)]
        input: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Where to run: cpu, cuda (every input in one batch on GPU 0; a build with
        /// --features cuda) or emulator (the CUDA kernels on the CPU, slowly).
        #[arg(long, value_enum, default_value = "cpu")]
        device: Device,
    },
    /// Rewrite a version 1 .moe (CRC-32 trailer) as version 2 (the checksum
    /// that parses in a fraction of the time on a microcontroller); the
    /// model itself is unchanged, byte for byte.
    Upgrade {
        /// The model to read.
        model: PathBuf,
        /// Output file (may be the input).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Feed tokens one at a time through a decoder (KV cache) and print the
    /// logits at every position and the experts every MoE layer chose.
    Eval {
        /// The decoder model.
        model: PathBuf,
        /// Token ids, comma-separated: 5,17,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Print one JSON object: {"logits": [[vocab] per position], "experts": [[[ids] per position] per MoE layer]}.
        #[arg(long)]
        json: bool,
        /// Where to run: cpu, cuda (GPU 0; a build with --features cuda), or emulator
        /// (the CUDA kernels on the CPU, slowly: a check without a GPU; needs a C++20 compiler).
        #[arg(long, value_enum, default_value = "cpu")]
        device: Device,
    },
    /// Continue a prompt with a decoder: the prompt as one batch, then one token
    /// at a time, greedy unless --temperature is set; prints the new token ids.
    Generate {
        /// The decoder model.
        model: PathBuf,
        /// The prompt's token ids, comma-separated: 5,17,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Tokens to generate (at most the context left after the prompt, plus one).
        #[arg(long, default_value_t = 16)]
        max_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: the smallest set of tokens whose probabilities reach this.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler's random numbers.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object: {"prompt": [ids], "tokens": [ids]}.
        #[arg(long)]
        json: bool,
        /// Where to run: cpu, cuda or emulator (as for eval).
        #[arg(long, value_enum, default_value = "cpu")]
        device: Device,
    },
}

/// Where a decoder runs.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    /// This machine's CPU.
    Cpu,
    /// GPU 0 (`--features cuda`).
    Cuda,
    /// The CUDA kernels on the CPU (`--features cuda`, a C++20 compiler).
    Emulator,
}

fn dtype(s: &str) -> Result<Dtype, HostError> {
    Dtype::parse(s).ok_or_else(|| HostError::Input(format!("unknown dtype {s:?} (f32, f16, int8, q15)")))
}

fn load(path: &Path) -> Result<AlignedBytes, HostError> {
    read_moe(path)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), HostError> {
    match cli.command {
        Command::Convert { dir, output, dtype: d, gate_dtype, calibration, context, kv_dtype, group } => {
            let gate = gate_dtype.as_deref().map(dtype).transpose()?;
            let kv_f16 = match kv_dtype.as_str() {
                "f32" => false,
                "f16" => true,
                k => return Err(HostError::Input(format!("--kv-dtype {k:?}: f32 or f16"))),
            };
            let bar = indicatif::ProgressBar::new(0).with_message("converting layers");
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let is_decoder = micromoe::host::is_decoder_checkpoint(&dir)?;
            if !is_decoder && (context.is_some() || kv_f16 || group.is_some()) {
                return Err(HostError::Input(
                    "--context, --kv-dtype and --group apply to decoders only".into(),
                ));
            }
            let bytes = if is_decoder {
                if calibration.is_some() {
                    return Err(HostError::Input(
                        "decoders need no --calibration (int8 quantizes activations per product)".into(),
                    ));
                }
                let opts = DecoderOptions {
                    dtype: dtype(&d)?,
                    gate_dtype: gate,
                    context,
                    kv_f16,
                    int8_group: group,
                };
                convert_decoder(&dir, &opts)
            } else {
                convert_with_progress(&dir, dtype(&d)?, gate, calibration.as_deref(), |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })
            };
            bar.finish_and_clear();
            let bytes = bytes?;
            std::fs::write(&output, &bytes).map_err(|e| HostError::Io(output.clone(), e))?;
            let model_bytes = AlignedBytes::from(&bytes[..]);
            if decoder_bytes(&model_bytes)? {
                let s = summarize_decoder(&Decoder::parse(&model_bytes)?)?;
                eprintln!(
                    "wrote {} ({} bytes, {} parameters, {} active per token, state {} bytes)",
                    output.display(),
                    s.flash_bytes,
                    s.total_params,
                    s.active_params,
                    s.state_bytes
                );
                return Ok(());
            }
            let s = summarize(&Model::parse(&model_bytes)?)?;
            eprintln!(
                "wrote {} ({} bytes, {} parameters, {} active, scratch {} bytes)",
                output.display(),
                s.flash_bytes,
                s.total_params,
                s.active_params,
                s.scratch_bytes
            );
        }
        Command::Eval { model, tokens, json, device } => eval(&model, &tokens, json, device)?,
        Command::Generate { model, tokens, max_tokens, temperature, top_p, seed, json, device } => {
            let sampler = micromoe::model::Sampler::new(temperature, top_p, seed);
            generate(&model, &tokens, max_tokens, sampler, json, device)?
        }
        Command::Upgrade { model, output } => {
            let bytes = load(&model)?;
            let new = micromoe::format::write::upgrade(&bytes)?;
            let what = if new.len() == bytes.len() { "already version 2" } else { "version 1 -> 2" };
            std::fs::write(&output, &new).map_err(|e| HostError::Io(output.clone(), e))?;
            eprintln!("wrote {} ({what}, {} bytes)", output.display(), new.len());
        }
        Command::Info { model, json } => {
            let bytes = load(&model)?;
            if decoder_bytes(&bytes)? {
                let s = summarize_decoder(&Decoder::parse(&bytes)?)?;
                if json {
                    println!("{}", s.to_json());
                } else {
                    print!("{s}");
                }
                return Ok(());
            }
            let s = summarize(&Model::parse(&bytes)?)?;
            if json {
                println!("{}", s.to_json());
            } else {
                print!("{s}");
            }
        }
        Command::Run { model, input, json, device } => {
            let bytes = load(&model)?;
            if decoder_bytes(&bytes)? {
                return Err(HostError::Input(
                    "a decoder takes tokens: use `micromoe eval MODEL --tokens 1,2,3`".into(),
                ));
            }
            let m = Model::parse(&bytes)?;
            let xs = read_inputs(&input, m.input_dim())?;
            let mut results = Vec::new();
            if device == Device::Cpu {
                let mut scratch = zeroed::<u8>(m.scratch_bytes(), "scratch")?;
                for x in xs.chunks_exact(m.input_dim()) {
                    let mut y = vec![0.0f32; m.output_dim()];
                    let mut experts: Vec<Vec<u16>> = Vec::new();
                    let mut weights: Vec<Vec<f32>> = Vec::new();
                    m.infer_observed(x, &mut y, &mut scratch, |s| {
                        experts.push(s.selection.iter().map(|c| c.expert).collect());
                        weights.push(s.selection.iter().map(|c| c.weight).collect());
                    })?;
                    let class = m.is_classifier().then(|| argmax(&y));
                    results.push((y, experts, weights, class));
                }
            } else {
                results = run_on_device(&m, &xs, device)?;
            }
            if json {
                let rows: Vec<_> = results
                    .iter()
                    .map(|(y, e, w, c)| json!({"output": y, "experts": e, "weights": w, "class": c}))
                    .collect();
                println!("{}", json!({ "results": rows }));
            } else {
                for (i, (y, e, w, c)) in results.iter().enumerate() {
                    let class = c.map(|c| format!("class {c}, ")).unwrap_or_default();
                    println!("#{i}: {class}experts {e:?} weights {w:?}");
                    println!("    output {y:?}");
                }
            }
        }
    }
    Ok(())
}

/// A decoder on a device: the steps `eval` and `generate` take.
trait Steps {
    /// One token; `on_layer(layer, selection)`.
    fn step(
        &mut self,
        token: u32,
        logits: &mut [f32],
        on_layer: &mut dyn FnMut(usize, &micromoe::Selection<f32>),
    ) -> Result<(), HostError>;

    /// A prompt as one batch; `on_layer(token, layer, selection)`.
    fn prefill(
        &mut self,
        tokens: &[u32],
        logits: &mut [f32],
        on_layer: &mut dyn FnMut(usize, usize, &micromoe::Selection<f32>),
    ) -> Result<(), HostError>;
}

struct Cpu<'d, 's> {
    dec: &'d Decoder<'d>,
    state: micromoe::model::State<'s>,
}

impl Steps for Cpu<'_, '_> {
    fn step(
        &mut self,
        token: u32,
        logits: &mut [f32],
        on_layer: &mut dyn FnMut(usize, &micromoe::Selection<f32>),
    ) -> Result<(), HostError> {
        Ok(self.dec.step(&mut self.state, token, logits, on_layer)?)
    }

    fn prefill(
        &mut self,
        tokens: &[u32],
        logits: &mut [f32],
        on_layer: &mut dyn FnMut(usize, usize, &micromoe::Selection<f32>),
    ) -> Result<(), HostError> {
        Ok(self.dec.prefill(&mut self.state, tokens, logits, on_layer)?)
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use micromoe::Selection;
    use micromoe::cuda::{CudaDecoder, CudaError, Emulator, Sequence, Target};
    use micromoe::host::HostError;

    pub(super) struct Gpu {
        pub(super) dec: CudaDecoder,
        pub(super) seq: Sequence,
    }

    /// `f` on GPU 0, or on the emulator compiled into a folder of this
    /// process's own (runs side by side do not share one), removed after.
    pub(super) fn with_target<R>(
        emulated: bool,
        f: impl FnOnce(Target<'_>) -> Result<R, HostError>,
    ) -> Result<R, HostError> {
        if !emulated {
            return f(Target::Gpu);
        }
        let dir = std::env::temp_dir().join(format!("micromoe-emulator-{}", std::process::id()));
        let out = Emulator::compile(&dir).map_err(error).and_then(|emu| f(Target::Emulator(&emu)));
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    pub(super) fn error(e: CudaError) -> HostError {
        match e {
            CudaError::Model(e) => HostError::Model(e),
            e => HostError::Device(e.to_string()),
        }
    }

    impl super::Steps for Gpu {
        fn step(
            &mut self,
            token: u32,
            logits: &mut [f32],
            on_layer: &mut dyn FnMut(usize, &Selection<f32>),
        ) -> Result<(), HostError> {
            self.dec.step(&mut self.seq, token, logits, on_layer).map_err(error)
        }

        fn prefill(
            &mut self,
            tokens: &[u32],
            logits: &mut [f32],
            on_layer: &mut dyn FnMut(usize, usize, &Selection<f32>),
        ) -> Result<(), HostError> {
            self.dec.prefill(&mut self.seq, tokens, logits, on_layer).map_err(error)
        }
    }
}

/// Runs `f` on `dec` on `device`.
fn on_device<R>(
    dec: &Decoder<'_>,
    device: Device,
    f: impl FnOnce(&mut dyn Steps) -> Result<R, HostError>,
) -> Result<R, HostError> {
    match device {
        Device::Cpu => {
            let mut buf = zeroed::<u8>(dec.state_bytes(), "the decoder's state (KV cache)")?;
            let state = dec.state(&mut buf)?;
            f(&mut Cpu { dec, state })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda | Device::Emulator => gpu::with_target(device == Device::Emulator, |target| {
            let dec = micromoe::cuda::CudaDecoder::on(target, dec, 1).map_err(gpu::error)?;
            let seq = dec.sequence().map_err(gpu::error)?;
            f(&mut gpu::Gpu { dec, seq })
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda | Device::Emulator => Err(no_cuda()),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> HostError {
    HostError::Device(
        "--device cuda and emulator need a micromoe built with the cuda feature \
         (cargo install micromoe --features cuda)"
            .into(),
    )
}

/// A decoder's bytes parsed, with the checks every command makes first.
fn decoder_of(bytes: &AlignedBytes) -> Result<Decoder<'_>, HostError> {
    if !decoder_bytes(bytes)? {
        return Err(HostError::Input(
            "a stack or multi-gate model takes inputs: use `micromoe run MODEL --input FILE`".into(),
        ));
    }
    Ok(Decoder::parse(bytes)?)
}

/// The step's own checks, before anything is printed or uploaded.
fn check_tokens(dec: &Decoder<'_>, tokens: &[u32], positions: usize) -> Result<(), HostError> {
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= dec.config().vocab) {
        return Err(
            micromoe::Error::OutOfRange { what: micromoe::error::What::Token, index: t as usize }.into()
        );
    }
    if positions > dec.config().context {
        return Err(micromoe::Error::ContextFull { context: dec.config().context }.into());
    }
    Ok(())
}

/// The indices of a decoder's MoE layers (the ones whose experts are printed).
fn moe_layers(dec: &Decoder<'_>) -> Vec<usize> {
    (0..dec.config().layers)
        .filter(|&l| dec.layer_config(l).map(|c| c.experts > 0).unwrap_or(false))
        .collect()
}

/// `eval`: logits per position and experts per MoE layer and position.
/// The logits are written as they are computed (JSON included), so memory
/// stays one vocabulary row whatever the number of tokens.
fn eval(path: &Path, tokens: &[u32], as_json: bool, device: Device) -> Result<(), HostError> {
    let bytes = load(path)?;
    let dec = decoder_of(&bytes)?;
    check_tokens(&dec, tokens, tokens.len())?;
    let moe = moe_layers(&dec);
    let mut experts: Vec<Vec<Vec<u16>>> = vec![Vec::new(); moe.len()];
    let mut out = zeroed::<f32>(dec.config().vocab, "logits")?;
    on_device(&dec, device, |steps| {
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::new(stdout.lock());
        let io = |e: std::io::Error| HostError::Io("stdout".into(), e);
        if as_json {
            write!(w, "{{\"logits\":[").map_err(io)?;
        }
        for (p, &t) in tokens.iter().enumerate() {
            steps.step(t, &mut out, &mut |l, sel| {
                if let Some(i) = moe.iter().position(|&x| x == l) {
                    experts[i].push(sel.iter().map(|c| c.expert).collect());
                }
            })?;
            if as_json {
                // serde_json's number format, one row at a time.
                let row = serde_json::to_string(&out).map_err(|e| HostError::Input(e.to_string()))?;
                write!(w, "{}{row}", if p > 0 { "," } else { "" }).map_err(io)?;
            } else {
                let routed: Vec<&Vec<u16>> = experts.iter().map(|e| &e[p]).collect();
                let best = argmax(&out);
                writeln!(w, "pos {p}: token {t} -> next {best} (logit {:.4}), experts {routed:?}", out[best])
                    .map_err(io)?;
            }
        }
        if as_json {
            let e = serde_json::to_string(&experts).map_err(|e| HostError::Input(e.to_string()))?;
            writeln!(w, "],\"experts\":{e}}}").map_err(io)?;
        }
        w.flush().map_err(io)
    })
}

/// `generate`: the prompt as one batch, then `n` tokens sampled one at a time.
fn generate(
    path: &Path,
    prompt: &[u32],
    n: usize,
    mut sampler: micromoe::model::Sampler,
    as_json: bool,
    device: Device,
) -> Result<(), HostError> {
    let bytes = load(path)?;
    let dec = decoder_of(&bytes)?;
    let context = dec.config().context;
    // The last new token is not fed: the prompt and n - 1 tokens must fit.
    if prompt.len() + n.saturating_sub(1) > context {
        return Err(HostError::Input(format!(
            "--max-tokens {n}: the context holds {context} positions and the prompt takes {}, \
             so at most {} more",
            prompt.len(),
            (context + 1).saturating_sub(prompt.len())
        )));
    }
    check_tokens(&dec, prompt, prompt.len())?;
    let vocab = dec.config().vocab;
    let (mut logits, mut order) = (zeroed::<f32>(vocab, "logits")?, zeroed::<u32>(vocab, "sampling")?);
    let new = on_device(&dec, device, |steps| {
        let mut new = Vec::with_capacity(n);
        if n == 0 {
            return Ok(new);
        }
        steps.prefill(prompt, &mut logits, &mut |_, _, _| {})?;
        loop {
            let next = sampler.sample(&mut logits, &mut order)?;
            new.push(next);
            if new.len() == n {
                return Ok(new);
            }
            steps.step(next, &mut logits, &mut |_, _| {})?;
        }
    })?;
    if as_json {
        println!("{}", json!({ "prompt": prompt, "tokens": new }));
    } else {
        let ids: Vec<String> = new.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

/// One input's output, experts and weights per layer, and class.
type RunResult = (Vec<f32>, Vec<Vec<u16>>, Vec<Vec<f32>>, Option<usize>);

/// `run` on the CUDA device (or its emulator): every input in one batch.
#[cfg(feature = "cuda")]
fn run_on_device(m: &Model<'_>, xs: &[f32], device: Device) -> Result<Vec<RunResult>, HostError> {
    gpu::with_target(device == Device::Emulator, |target| {
        let gpu = micromoe::cuda::CudaModel::on(target, m).map_err(gpu::error)?;
        let mut out = zeroed::<f32>(xs.len() / m.input_dim() * m.output_dim(), "outputs")?;
        let chosen = gpu.infer_batch(xs, &mut out).map_err(gpu::error)?;
        Ok(out
            .chunks_exact(m.output_dim())
            .enumerate()
            .map(|(t, y)| {
                let experts = chosen.iter().map(|l| l[t].iter().map(|c| c.expert).collect()).collect();
                let weights = chosen.iter().map(|l| l[t].iter().map(|c| c.weight).collect()).collect();
                (y.to_vec(), experts, weights, m.is_classifier().then(|| argmax(y)))
            })
            .collect())
    })
}

#[cfg(not(feature = "cuda"))]
fn run_on_device(_: &Model<'_>, _: &[f32], _: Device) -> Result<Vec<RunResult>, HostError> {
    Err(no_cuda())
}

fn argmax(y: &[f32]) -> usize {
    y.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0
}

/// Whether `bytes` hold a decoder (the header alone; each graph's parse
/// checks the rest).
fn decoder_bytes(bytes: &[u8]) -> Result<bool, HostError> {
    Ok(micromoe::format::Header::parse(bytes)?.arch == micromoe::format::arch::DECODER)
}
