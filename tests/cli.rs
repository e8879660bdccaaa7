//! The `micromoe` command line: conversion reproduces the committed models,
//! `info` and `run` report them, and bad checkpoints are refused by name.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

const DIGITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits");

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
fn conversion_reproduces_the_committed_models() {
    let dir = tmp("convert");
    let calibration = format!("{DIGITS}/calibration.safetensors");
    for dtype in ["f32", "f16", "int8", "q15"] {
        let out = dir.join(format!("{dtype}.moe"));
        let mut args = vec!["convert", DIGITS, "-o", out.to_str().unwrap(), "--dtype", dtype];
        if dtype == "int8" || dtype == "q15" {
            args.extend(["--calibration", calibration.as_str()]);
        }
        let (ok, _, err) = micromoe(&args);
        assert!(ok, "{dtype}: {err}");
        let committed = std::fs::read(format!("{DIGITS}/digits_{dtype}.moe")).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), committed, "{dtype}: conversion is not reproducible");
    }
}

#[test]
fn info_and_run_report_the_model() {
    let model = format!("{DIGITS}/digits_int8.moe");
    let (ok, out, err) = micromoe(&["info", &model, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["flash_bytes"].as_u64().unwrap() as usize,
        std::fs::metadata(&model).unwrap().len() as usize
    );
    assert_eq!(v["total_params"], 4 * (64 * 32 + 32 + 32 * 10 + 10) + 4 * 64);
    assert_eq!(v["active_params"], (64 * 32 + 32 + 32 * 10 + 10) + 4 * 64);
    assert_eq!(v["layers"][0]["expert_dtype"], "int8");
    let (ok, text, _) = micromoe(&["info", &model]);
    assert!(ok && text.contains("top-1 softmax (Switch)"), "{text}");

    // Two inputs as JSON: a blank image and a bright one.
    let input = tmp("run").join("x.json");
    std::fs::write(&input, format!("[{:?}, {:?}]", vec![0.0; 64], vec![1.0; 64])).unwrap();
    let (ok, out, err) = micromoe(&["run", &model, "--input", input.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["output"].as_array().unwrap().len(), 10);
    assert!(results[0]["class"].as_u64().unwrap() < 10);
    assert_eq!(results[0]["experts"][0].as_array().unwrap().len(), 1);
    // The wrong width is refused.
    std::fs::write(&input, "[1, 2, 3]").unwrap();
    let (ok, _, err) = micromoe(&["run", &model, "--input", input.to_str().unwrap()]);
    assert!(!ok && err.contains("the model takes 64"), "{err}");
}

/// A copy of the digits checkpoint with `edit` applied to its tensors and
/// `config` to its config.json.
fn broken(
    name: &str,
    edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>),
    config: impl Fn(&str) -> String,
) -> PathBuf {
    let dir = tmp(name);
    let bytes = std::fs::read(format!("{DIGITS}/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::tensor::serialize(views, None).unwrap())
        .unwrap();
    let cfg = std::fs::read_to_string(format!("{DIGITS}/config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config(&cfg)).unwrap();
    dir
}

fn convert_error(dir: &Path) -> String {
    let out = dir.join("out.moe");
    let (ok, _, err) = micromoe(&["convert", dir.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!ok, "accepted");
    err
}

#[test]
fn bad_checkpoints_are_refused_by_name() {
    let same = |c: &str| c.to_string();
    let keep = |_: &mut Vec<(String, Vec<usize>, Vec<u8>)>| {};
    let err = convert_error(&broken(
        "missing",
        |t| t.retain(|(n, _, _)| n != "layers.0.experts.3.down.bias"),
        same,
    ));
    assert!(err.contains("layers.0.experts.3.down.bias: missing"), "{err}");
    let err = convert_error(&broken(
        "extra",
        |t| t.push(("layers.0.experts.9.up.weight".into(), vec![1], vec![0; 4])),
        same,
    ));
    assert!(err.contains("layers.0.experts.9.up.weight: not part of the model"), "{err}");
    let err = convert_error(&broken(
        "shape",
        |t| {
            let e = t.iter_mut().find(|(n, _, _)| n == "layers.0.gate.weight").unwrap();
            e.1 = vec![64, 4];
        },
        same,
    ));
    assert!(err.contains("layers.0.gate.weight: expected shape [4, 64], found [64, 4]"), "{err}");
    let err = convert_error(&broken("router", keep, |c| c.replace("\"switch\"", "\"nope\"")));
    assert!(err.contains("layers[0].router: unknown \"nope\""), "{err}");
    let err = convert_error(&broken("k", keep, |c| c.replace("\"k\": 1", "\"k\": 9")));
    assert!(err.contains("layers[0].k"), "{err}");
    let err = convert_error(&broken("arch", keep, |c| c.replace("\"moe_mlp\"", "\"MixtralForCausalLM\"")));
    assert!(err.contains("MixtralForCausalLM"), "{err}");
    let err = convert_error(&broken("nan", |t| t[0].2[0..4].copy_from_slice(&f32::NAN.to_le_bytes()), same));
    assert!(err.contains("not finite"), "{err}");
    // int8 without calibration data.
    let dir = broken("calib", keep, same);
    let out = dir.join("out.moe");
    let (ok, _, err) =
        micromoe(&["convert", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--dtype", "int8"]);
    assert!(!ok && err.contains("--calibration"), "{err}");
}

#[test]
fn info_names_the_int8_group() {
    let tinylm = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tinylm");
    for (file, want) in [("tinylm_int8.moe", "\"int8\""), ("tinylm_int8_g32.moe", "\"int8/g32\"")] {
        let (ok, out, err) = micromoe(&["info", &format!("{tinylm}/{file}"), "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["dtypes"]["experts"].to_string(), want, "{file}");
    }
    // --group is checked before any tensor is read.
    let out = tmp("group").join("x.moe");
    let (ok, _, err) =
        micromoe(&["convert", tinylm, "-o", out.to_str().unwrap(), "--dtype", "int8", "--group", "24"]);
    assert!(!ok && err.contains("multiple of 16"), "{err}");
}
