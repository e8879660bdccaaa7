//! The committed digits models against PyTorch's test-set logits.

use micromoe::Model;
use micromoe::{include_model, scratch_len};
use safetensors::SafeTensors;

mod tensors;
use tensors::{f32s, i64s};

const F32: &[u8] = include_model!("../models/digits/digits_f32.moe");
const F16: &[u8] = include_model!("../models/digits/digits_f16.moe");
const INT8: &[u8] = include_model!("../models/digits/digits_int8.moe");
const Q15: &[u8] = include_model!("../models/digits/digits_q15.moe");
const TEST: &[u8] = include_bytes!("../models/digits/test.safetensors");

/// A static scratch of exactly the size the int8 model needs, fixed at
/// compile time (a smaller literal here would not compile with `check`).
static INT8_SCRATCH: std::sync::Mutex<[u8; scratch_len!(INT8)]> =
    std::sync::Mutex::new([0; scratch_len!(INT8)]);
const _: () = assert!(scratch_len!(INT8) < 1024, "the digits model must fit a 16 KB microcontroller");

struct TestSet {
    x: Vec<f32>,
    labels: Vec<usize>,
    logits: Vec<f32>,
    experts: Vec<usize>,
}

fn test_set() -> TestSet {
    let st = SafeTensors::deserialize(TEST).unwrap();
    TestSet {
        x: f32s(&st, "x"),
        labels: i64s(&st, "label").into_iter().map(|v| v as usize).collect(),
        logits: f32s(&st, "logits"),
        experts: i64s(&st, "experts").into_iter().map(|v| v as usize).collect(),
    }
}

fn argmax(y: &[f32]) -> usize {
    y.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

/// (accuracy, largest |logit - PyTorch|, experts identical to PyTorch's)
fn evaluate(bytes: &[u8], scratch: &mut [u8]) -> (f64, f32, usize) {
    let t = test_set();
    let model = Model::parse(bytes).unwrap();
    let (mut correct, mut worst, mut same) = (0, 0.0f32, 0);
    for (i, x) in t.x.chunks_exact(64).enumerate() {
        let mut y = [0.0f32; 10];
        let mut chosen = usize::MAX;
        model.infer_observed(x, &mut y, scratch, |s| chosen = s.selection[0].expert as usize).unwrap();
        correct += (argmax(&y) == t.labels[i]) as usize;
        same += (chosen == t.experts[i]) as usize;
        for (a, b) in y.iter().zip(&t.logits[i * 10..(i + 1) * 10]) {
            worst = worst.max((a - b).abs());
        }
    }
    (correct as f64 / t.labels.len() as f64, worst, same)
}

#[test]
fn f32_model_reproduces_pytorch_logits() {
    let mut scratch = vec![0u8; Model::parse(F32).unwrap().scratch_bytes()];
    let (acc, worst, same) = evaluate(F32, &mut scratch);
    let t = test_set();
    let ref_acc =
        t.logits.chunks_exact(10).zip(&t.labels).filter(|(l, c)| argmax(l) == **c).count() as f64 / 360.0;
    println!("f32: accuracy {acc:.4} (PyTorch {ref_acc:.4}), max logit error {worst:e}");
    assert!(worst <= 1e-4, "{worst}");
    assert_eq!(same, 360);
    assert_eq!(acc, ref_acc);
}

#[test]
fn quantized_models_keep_accuracy() {
    let mut scratch = vec![0u8; 4096];
    let (f32_acc, _, _) = evaluate(F32, &mut scratch);
    let (f16_acc, f16_err, _) = evaluate(F16, &mut scratch);
    let (q15_acc, _, _) = evaluate(Q15, &mut scratch);
    let (int8_acc, int8_err, int8_same) = {
        let mut s = INT8_SCRATCH.lock().unwrap();
        evaluate(INT8, &mut s[..])
    };
    println!(
        "f16 {f16_acc:.4} (max logit error {f16_err:e}), int8 {int8_acc:.4} ({int8_err:e}, {int8_same}/360 same expert), q15 {q15_acc:.4}"
    );
    assert!((f32_acc - int8_acc).abs() <= 0.015, "int8 {int8_acc} vs f32 {f32_acc}");
    assert!((f32_acc - q15_acc).abs() <= 0.015);
    assert!((f32_acc - f16_acc).abs() <= 0.005);
    assert!(f16_err < 2e-2);
    // Calibrated on the whole training set, the int8 logits stay within a few
    // output steps of PyTorch's (no saturation on the test set).
    let step = Model::parse(INT8).unwrap().layer_info(0).unwrap().output.scale;
    assert!(int8_err <= 4.0 * step, "int8 logit error {int8_err} vs step {step}");
}

#[test]
fn exact_scratch_is_enough_and_one_byte_less_is_not() {
    let model = Model::parse(INT8).unwrap();
    assert_eq!(model.scratch_bytes(), scratch_len!(INT8));
    let mut s = INT8_SCRATCH.lock().unwrap();
    let n = s.len();
    let x = [0.5f32; 64];
    let mut y = [0.0f32; 10];
    model.infer(&x, &mut y, &mut s[..]).unwrap();
    assert!(model.infer(&x, &mut y, &mut s[..n - 1]).is_err());
}
