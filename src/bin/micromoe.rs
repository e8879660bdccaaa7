//! `micromoe`: convert checkpoints to `.moe`, describe models, run them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use micromoe::format::Model;
use micromoe::format::write::AlignedBytes;
use micromoe::host::{Dtype, HostError, convert_with_progress, read_inputs, summarize};
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
    },
}

fn dtype(s: &str) -> Result<Dtype, HostError> {
    Dtype::parse(s).ok_or_else(|| HostError::Input(format!("unknown dtype {s:?} (f32, f16, int8, q15)")))
}

fn load(path: &PathBuf) -> Result<AlignedBytes, HostError> {
    let bytes = std::fs::read(path).map_err(|e| HostError::Io(path.clone(), e))?;
    Ok(AlignedBytes::from(&bytes[..]))
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
        Command::Convert { dir, output, dtype: d, gate_dtype, calibration } => {
            let gate = gate_dtype.as_deref().map(dtype).transpose()?;
            let bar = indicatif::ProgressBar::new(0).with_message("converting layers");
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let bytes =
                convert_with_progress(&dir, dtype(&d)?, gate, calibration.as_deref(), |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                });
            bar.finish_and_clear();
            let bytes = bytes?;
            std::fs::write(&output, &bytes).map_err(|e| HostError::Io(output.clone(), e))?;
            let model_bytes = AlignedBytes::from(&bytes[..]);
            let model = Model::parse(&model_bytes)?;
            let s = summarize(&model)?;
            eprintln!(
                "wrote {} ({} bytes, {} parameters, {} active, scratch {} bytes)",
                output.display(),
                s.flash_bytes,
                s.total_params,
                s.active_params,
                s.scratch_bytes
            );
        }
        Command::Info { model, json } => {
            let bytes = load(&model)?;
            let m = Model::parse(&bytes)?;
            let s = summarize(&m)?;
            if json {
                println!("{}", s.to_json());
            } else {
                print!("{s}");
            }
        }
        Command::Run { model, input, json } => {
            let bytes = load(&model)?;
            let m = Model::parse(&bytes)?;
            let xs = read_inputs(&input, m.input_dim())?;
            let mut scratch = vec![0u8; m.scratch_bytes()];
            let mut results = Vec::new();
            for x in xs.chunks_exact(m.input_dim()) {
                let mut y = vec![0.0f32; m.output_dim()];
                let mut experts: Vec<Vec<u16>> = Vec::new();
                let mut weights: Vec<Vec<f32>> = Vec::new();
                m.infer(x, &mut y, &mut scratch, |s| {
                    experts.push(s.selection.iter().map(|c| c.expert).collect());
                    weights.push(s.selection.iter().map(|c| c.weight).collect());
                })?;
                let class = m.is_classifier().then(|| argmax(&y));
                results.push((y, experts, weights, class));
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

fn argmax(y: &[f32]) -> usize {
    y.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0
}
