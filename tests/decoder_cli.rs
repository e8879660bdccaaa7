//! The decoder side of the `micromoe` command line: `eval --json` against
//! transformers, `info`, and Hugging Face checkpoints refused by the field
//! or tensor at fault.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders").join(name)
}

fn micromoe(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_micromoe")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn eval_json_matches_transformers() {
    let dir = tmp("eval");
    for name in ["qwen2_moe_dense_layers", "mixtral_8x2_untied"] {
        let model = dir.join(format!("{name}.moe"));
        let (ok, _, err) =
            micromoe(&["convert", fixture(name).to_str().unwrap(), "-o", model.to_str().unwrap()]);
        assert!(ok, "{err}");
        let r: Value =
            serde_json::from_slice(&std::fs::read(fixture(name).join("reference.json")).unwrap()).unwrap();
        let tokens: Vec<String> = r["tokens"].as_array().unwrap().iter().map(|t| t.to_string()).collect();
        let (ok, out, err) =
            micromoe(&["eval", model.to_str().unwrap(), "--tokens", &tokens.join(","), "--json"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["experts"], r["experts"], "{name}: experts");
        let ours = v["logits"].as_array().unwrap();
        assert_eq!(ours.len(), tokens.len());
        for (a, b) in ours.iter().zip(r["logits"].as_array().unwrap()) {
            for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!((x - y).abs() <= 1e-4, "{name}: logit {x} vs {y}");
            }
        }
        let (ok, out, _) = micromoe(&["info", model.to_str().unwrap(), "--json"]);
        assert!(ok);
        let info: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(info["architecture"], "decoder");
        assert_eq!(info["flash_bytes"].as_u64().unwrap(), std::fs::metadata(&model).unwrap().len());
    }
}

#[test]
fn eval_refuses_bad_tokens_and_other_models() {
    let dir = tmp("eval_bad");
    let model = dir.join("m.moe");
    let (ok, _, err) = micromoe(&[
        "convert",
        fixture("mixtral_tied").to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
        "--context",
        "4",
    ]);
    assert!(ok, "{err}");
    let m = model.to_str().unwrap();
    let (ok, _, err) = micromoe(&["eval", m, "--tokens", "1,96"]);
    assert!(!ok && err.contains("token id"), "{err}");
    let (ok, _, err) = micromoe(&["eval", m, "--tokens", "1,2,3,4,5"]);
    assert!(!ok && err.contains("context full"), "{err}");
    let digits = concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_f32.moe");
    let (ok, _, err) = micromoe(&["eval", digits, "--tokens", "1"]);
    assert!(!ok && err.contains("micromoe run"), "{err}");
}

/// A checkpoint split into two shards with an index, as `save_pretrained`
/// writes large models, converts to the same bytes as the single file.
#[test]
fn sharded_checkpoints_convert_the_same() {
    let src = fixture("qwen2_moe_dense_layers");
    let dir = tmp("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let half = tensors.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        for (name, _) in part {
            map.insert(name.clone(), Value::from(file.clone()));
        }
        safetensors::serialize_to_file(part.iter().cloned(), None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (a, b) = (dir.join("a.moe"), tmp("single").join("b.moe"));
    let (ok, _, err) =
        micromoe(&["convert", dir.to_str().unwrap(), "-o", a.to_str().unwrap(), "--dtype", "f16"]);
    assert!(ok, "{err}");
    let (ok, _, err) =
        micromoe(&["convert", src.to_str().unwrap(), "-o", b.to_str().unwrap(), "--dtype", "f16"]);
    assert!(ok, "{err}");
    assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap());
}

/// Copies a fixture, edits config.json with `edit` and keeps the tensors
/// for which `keep(name)` holds; returns the refusal message.
fn refusal(edit: impl Fn(&mut Value), keep: impl Fn(&str) -> bool, extra: &[&str]) -> String {
    let src = fixture("qwen2_moe_shared");
    let dir = tmp(&format!("refuse_{}", std::process::id() as u64 ^ rand_suffix()));
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    for name in extra {
        let (_, v) = st.tensors().into_iter().next().unwrap();
        views.push((name.to_string(), v));
    }
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let out = dir.join("m.moe");
    let mut args = vec!["convert", dir.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let dtype = cfg.get("__dtype").and_then(Value::as_str).map(String::from);
    if let Some(d) = &dtype {
        args.extend(["--dtype", d.as_str()]);
    }
    let (ok, _, err) = micromoe(&args);
    assert!(!ok, "accepted");
    err
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed) << 20
}

#[test]
fn unsupported_checkpoints_are_refused_by_name() {
    let all = |_: &str| true;
    let set = |k: &'static str, v: Value| move |c: &mut Value| c[k] = v.clone();
    let cases: Vec<(String, &str)> = vec![
        (refusal(set("use_sliding_window", Value::Bool(true)), all, &[]), "use_sliding_window"),
        (
            refusal(set("architectures", serde_json::json!(["LlamaForCausalLM"])), all, &[]),
            "LlamaForCausalLM",
        ),
        (refusal(set("hidden_act", Value::from("gelu")), all, &[]), "hidden_act"),
        (
            refusal(set("layer_types", serde_json::json!(["full_attention", "sliding_attention"])), all, &[]),
            "layer_types",
        ),
        (
            refusal(
                set("rope_parameters", serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4})),
                all,
                &[],
            ),
            "rope_type",
        ),
        (refusal(set("num_attention_heads", Value::from(5)), all, &[]), "num_attention_heads"),
        (
            refusal(|_| {}, |n| !n.ends_with("layers.1.mlp.experts.2.up_proj.weight"), &[]),
            "experts.2.up_proj",
        ),
        (refusal(|_| {}, |n| !n.contains("layers.0.self_attn.k_proj.bias"), &[]), "k_proj.bias"),
        (refusal(|_| {}, all, &["model.layers.0.mlp.experts.9.w1.weight"]), "experts.9.w1"),
        (refusal(set("__dtype", Value::from("q15")), all, &[]), "q15"),
    ];
    for (err, needle) in cases {
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
}

/// The tiny LM's prompts and transformers' greedy continuations (models/tinylm).
fn tinylm_greedy() -> Vec<(String, Vec<u32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinylm/reference.json");
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["greedy"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, c)| (p.clone(), c.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()))
        .collect()
}

/// `generate` (the prompt as one prefill, then greedy steps) continues each
/// prompt as transformers' `generate` does, token for token, in both output
/// formats; its refusals name the limit.
#[test]
fn generate_follows_transformers_greedy() {
    let dir = tmp("generate");
    let model = dir.join("tinylm.moe");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinylm");
    let (ok, _, err) =
        micromoe(&["convert", src.to_str().unwrap(), "-o", model.to_str().unwrap(), "--context", "128"]);
    assert!(ok, "{err}");
    let m = model.to_str().unwrap();
    for (prompt, theirs) in tinylm_greedy() {
        let ids: Vec<String> = prompt.bytes().map(|b| b.to_string()).collect();
        let n = theirs.len().to_string();
        let (ok, out, err) =
            micromoe(&["generate", m, "--tokens", &ids.join(","), "--max-tokens", &n, "--json"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let ours: Vec<u32> =
            v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(ours, theirs, "prompt {prompt:?}");
        let (ok, text, err) = micromoe(&["generate", m, "--tokens", &ids.join(","), "--max-tokens", &n]);
        assert!(ok, "{err}");
        let listed: Vec<String> = theirs.iter().map(u32::to_string).collect();
        assert_eq!(text.trim(), listed.join(","));
    }
    // The tiny LM's context is 128: a 100-token prompt leaves room for 29.
    let long = vec!["65"; 100].join(",");
    let (ok, out, _) = micromoe(&["generate", m, "--tokens", &long, "--max-tokens", "29"]);
    assert!(ok && out.trim().split(',').count() == 29);
    let (ok, _, err) = micromoe(&["generate", m, "--tokens", &long, "--max-tokens", "30"]);
    assert!(!ok && err.contains("at most 29 more"), "{err}");
    let (ok, _, err) = micromoe(&["generate", m, "--tokens", "65,200"]);
    assert!(!ok && err.contains("token id"), "{err}");
    let (ok, _, err) = micromoe(&["generate", m, "--tokens", "65", "--temperature=-1"]);
    assert!(!ok && err.contains("temperature"), "{err}");
    // Sampling with a seed repeats itself.
    let sampled =
        |seed: &str| micromoe(&["generate", m, "--tokens", "65", "--temperature", "0.8", "--seed", seed]).1;
    assert_eq!(sampled("7"), sampled("7"));
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = micromoe(&["generate", m, "--tokens", "65", "--device", "cuda"]);
        assert!(!ok && err.contains("--features cuda"), "{err}");
    }
}
