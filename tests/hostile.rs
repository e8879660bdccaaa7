//! Hostile inputs to the command line, each made here by a generator: the
//! CLI runs under a 512 MiB address-space limit (`ulimit -v`) and a kill
//! timer, and must refuse every one with a specific message and exit code 1:
//! no abort (out of memory), no hang, no file read outside the checkpoint,
//! no silently wrong output.
#![cfg(unix)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::tensor::TensorView;
use serde_json::{Value, json};

/// Address space the CLI may use, in KiB.
const LIMIT_KIB: u64 = 512 * 1024;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the CLI under the memory limit; kills it after 60 s. Returns the
/// exit code (None: killed by a signal or the timer) and stderr.
fn limited(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {LIMIT_KIB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_micromoe"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            return (None, "killed after 60 s (a hang)".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Refused cleanly, with `needle` in the message.
fn refused(args: &[&str], needle: &str) {
    let (code, err) = limited(args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err:?}");
}

/// The shape of a generated Mixtral checkpoint.
#[derive(Clone, Copy)]
struct Dims {
    vocab: usize,
    hidden: usize,
    head_dim: usize,
    layers: usize,
    context: usize,
    /// Every weight's value.
    scale: f32,
}

const SMALL: Dims = Dims { vocab: 16, hidden: 8, head_dim: 4, layers: 1, context: 16, scale: 0.05 };

/// A `MixtralForCausalLM` checkpoint (one head, one KV head, 2 experts of
/// width 4, top-1, tied) written to `dir`; returns its config.
fn mixtral(dir: &Path, d: Dims) -> Value {
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![d.vocab, d.hidden])];
    tensors.push(("model.norm.weight".into(), vec![d.hidden]));
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![d.head_dim, d.hidden]),
            ("self_attn.k_proj.weight", vec![d.head_dim, d.hidden]),
            ("self_attn.v_proj.weight", vec![d.head_dim, d.hidden]),
            ("self_attn.o_proj.weight", vec![d.hidden, d.head_dim]),
            ("input_layernorm.weight", vec![d.hidden]),
            ("post_attention_layernorm.weight", vec![d.hidden]),
            ("block_sparse_moe.gate.weight", vec![2, d.hidden]),
        ] {
            tensors.push((format!("{p}.{n}"), shape));
        }
        for e in 0..2 {
            for (w, shape) in [("w1", [4, d.hidden]), ("w3", [4, d.hidden]), ("w2", [d.hidden, 4])] {
                tensors.push((format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"), shape.to_vec()));
            }
        }
    }
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, (_, s))| {
            let n: usize = s.iter().product();
            (0..n).flat_map(|j| (d.scale * if (i + j) % 3 == 0 { -1.0 } else { 1.0 }).to_le_bytes()).collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), b)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let config = json!({
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": d.vocab, "hidden_size": d.hidden, "head_dim": d.head_dim,
        "num_hidden_layers": d.layers, "num_attention_heads": 1, "num_key_value_heads": 1,
        "max_position_embeddings": d.context, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        "num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 4, "hidden_act": "silu"
    });
    write_config(dir, &config);
    config
}

fn write_config(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
}

fn convert(dir: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["convert", dir.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, err) = limited(&args);
    assert_eq!(code, Some(0), "convert: {err}");
}

#[test]
fn counts_in_config_json_are_bounded_before_allocation() {
    let dir = tmp("layers");
    let mut config = mixtral(&dir, SMALL);
    let out = dir.join("m.moe");
    for n in [u32::MAX as u64, 50_000_000] {
        config["num_hidden_layers"] = json!(n);
        write_config(&dir, &config);
        refused(&["convert", dir.to_str().unwrap(), "-o", out.to_str().unwrap()], "num_hidden_layers");
    }
}

#[test]
fn a_state_larger_than_memory_is_an_error() {
    // 64 layers x 131,072 positions x 2,048 KV width: a 137 GB f32 cache,
    // from a checkpoint of a few megabytes.
    let dir = tmp("state");
    mixtral(&dir, Dims { vocab: 4, hidden: 1, head_dim: 2048, layers: 64, context: 1 << 17, scale: 0.01 });
    let m = dir.join("m.moe");
    convert(&dir, &m, &["--dtype", "int8"]);
    let (code, err) = limited(&["info", m.to_str().unwrap()]);
    assert_eq!(code, Some(0), "info: {err}");
    refused(&["eval", m.to_str().unwrap(), "--tokens", "1,2"], "needs 1374395");
    // 2 GiB: under MICROMOE_MAX_ALLOC, over this process's 512 MiB, so the
    // fallible allocation is what refuses it (no abort).
    let dir = tmp("state_2g");
    mixtral(&dir, Dims { vocab: 4, hidden: 1, head_dim: 512, layers: 64, context: 8192, scale: 0.01 });
    let m = dir.join("m.moe");
    convert(&dir, &m, &["--dtype", "int8"]);
    refused(&["eval", m.to_str().unwrap(), "--tokens", "1,2"], "needs 2147");
}

#[test]
fn big_and_special_files_are_refused_before_reading() {
    let dir = tmp("files");
    // 2 GiB, sparse: not a model (refused after 64 bytes), and a header
    // that claims the whole size (refused when the buffer cannot be had).
    let big = dir.join("big.moe");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    for cmd in ["info", "run", "eval"] {
        let mut args = vec![cmd, big.to_str().unwrap()];
        args.extend_from_slice(match cmd {
            "run" => &["--input", "x.json"][..],
            "eval" => &["--tokens", "1"][..],
            _ => &[][..],
        });
        refused(&args, "magic");
    }
    let mut head =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits/digits_int8.moe")).unwrap();
    head.truncate(64);
    head[12..16].copy_from_slice(&(2u32 << 30).to_le_bytes());
    std::fs::OpenOptions::new().write(true).open(&big).unwrap().write_all_at(&head, 0).unwrap();
    refused(&["info", big.to_str().unwrap()], "MICROMOE_MAX_ALLOC");

    // /dev/zero as a .moe, a config.json, a model.safetensors; a FIFO.
    let zero = dir.join("zero.moe");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    refused(&["info", zero.to_str().unwrap()], "not a regular file");
    let ck = dir.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    mixtral(&ck, SMALL);
    let out = dir.join("out.moe");
    let conv = ["convert", ck.to_str().unwrap(), "-o", out.to_str().unwrap()];
    std::fs::remove_file(ck.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", ck.join("model.safetensors")).unwrap();
    refused(&conv, "not a regular file");
    std::fs::remove_file(ck.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", ck.join("config.json")).unwrap();
    refused(&conv, "not a regular file");
    std::fs::remove_file(ck.join("config.json")).unwrap();
    assert!(Command::new("mkfifo").arg(ck.join("config.json")).status().unwrap().success());
    refused(&conv, "not a regular file");
}

#[test]
fn shard_names_cannot_leave_the_checkpoint() {
    let root = tmp("shards");
    let ck = root.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    mixtral(&ck, SMALL);
    // Another checkpoint beside it, and links out of the directory.
    std::fs::copy(ck.join("model.safetensors"), root.join("other.safetensors")).unwrap();
    std::os::unix::fs::symlink(root.join("other.safetensors"), ck.join("link.safetensors")).unwrap();
    std::fs::rename(ck.join("model.safetensors"), ck.join("model-00001.safetensors")).unwrap();
    let out = root.join("m.moe");
    let conv = ["convert", ck.to_str().unwrap(), "-o", out.to_str().unwrap()];
    for (name, why) in [
        ("../other.safetensors", "not a file name inside"),
        ("/etc/passwd", "not a file name inside"),
        ("/dev/zero", "not a file name inside"),
        ("link.safetensors", "outside the checkpoint"),
    ] {
        let index = json!({"weight_map": {"model.embed_tokens.weight": name}});
        std::fs::write(ck.join("model.safetensors.index.json"), index.to_string()).unwrap();
        refused(&conv, why);
    }
    // The same index with the real shard converts.
    let index = json!({"weight_map": {"model.embed_tokens.weight": "model-00001.safetensors"}});
    std::fs::write(ck.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (code, err) = limited(&conv);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn overflowing_activations_are_errors_not_zeros() {
    // Weights of 3e38: RMSNorm's mean square overflows; 1/sqrt(inf) = 0
    // would turn every logit into 0.0.
    let dir = tmp("overflow");
    mixtral(&dir, Dims { scale: 3e38, ..SMALL });
    let m = dir.join("m.moe");
    convert(&dir, &m, &[]);
    refused(&["eval", m.to_str().unwrap(), "--tokens", "1,2", "--json"], "hidden state: NaN or infinity");
}

#[test]
fn eval_json_streams_a_large_vocabulary() {
    // 131,072 logits x 64 positions: 8.4 M numbers, printed as they come
    // (kept whole as JSON values they took gigabytes).
    let dir = tmp("vocab");
    mixtral(&dir, Dims { vocab: 1 << 17, hidden: 2, head_dim: 2, layers: 1, context: 64, scale: 0.1 });
    let m = dir.join("m.moe");
    convert(&dir, &m, &["--dtype", "f16"]);
    let tokens: Vec<String> = (0..64).map(|t| (t * 1000).to_string()).collect();
    let (code, err) = limited(&["eval", m.to_str().unwrap(), "--tokens", &tokens.join(","), "--json"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn expert_ids_never_reach_the_shared_and_layer_keys() {
    use micromoe::Model;
    use micromoe::format::{layout, write::AlignedBytes};
    let mut b =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits/digits_f32.moe")).unwrap();
    // The first layer record follows the header; its word 3 is the expert
    // count (the layout in `format`'s rustdoc).
    let at = layout::HEADER_LEN + 4 * 3;
    for experts in [0xFFFFu32, 0xFFFE] {
        b[at..at + 4].copy_from_slice(&experts.to_le_bytes());
        assert!(layout::seal(&mut b));
        let err = Model::parse(&AlignedBytes::from(&b[..])).unwrap_err();
        assert_eq!(
            err,
            micromoe::Error::BadField { field: micromoe::error::Field::Routing, layer: 0 },
            "{experts}"
        );
    }
}
