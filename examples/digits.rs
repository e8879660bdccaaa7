//! The main job: the digits MoE classifier (trained by `tools/train_digits.py`
//! on scikit-learn's handwritten digits, converted by `micromoe convert`) run
//! in every numeric type over the 360 held-out test images, against PyTorch.
//!
//! ```text
//! cargo run --release --example digits [-- --json]
//! ```

use micromoe::Model;
use micromoe::include_model;
use safetensors::SafeTensors;
use serde_json::json;

/// The models, in flash-like static memory, 16-byte aligned.
const MODELS: [(&str, &[u8]); 4] = [
    ("f32", include_model!("../models/digits/digits_f32.moe")),
    ("f16", include_model!("../models/digits/digits_f16.moe")),
    ("int8", include_model!("../models/digits/digits_int8.moe")),
    ("q15", include_model!("../models/digits/digits_q15.moe")),
];

/// Scratch for the largest of them, sized at compile time.
const SCRATCH: usize = {
    let mut max = 0;
    let mut i = 0;
    while i < MODELS.len() {
        let n = micromoe::scratch_len!(MODELS[i].1);
        if n > max {
            max = n;
        }
        i += 1;
    }
    max
};

const TEST: &[u8] = include_bytes!("../models/digits/test.safetensors");
const CLASSES: usize = 10;
const EXPERTS: usize = 4;

fn floats(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).expect("tensor in test.safetensors");
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn ints(st: &SafeTensors<'_>, name: &str) -> Vec<usize> {
    let t = st.tensor(name).expect("tensor in test.safetensors");
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as usize).collect()
}

fn argmax(y: &[f32]) -> usize {
    y.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

struct Result {
    dtype: &'static str,
    accuracy: f64,
    agreement: f64,
    same_experts: f64,
    max_logit_err: f32,
    flash_bytes: usize,
    scratch_bytes: usize,
    usage: [[u32; EXPERTS]; CLASSES],
    macs: u64,
    macs_dense: u64,
}

fn main() {
    let json_out = std::env::args().any(|a| a == "--json");
    let test = SafeTensors::deserialize(TEST).expect("test set");
    let (x, labels, ref_logits, ref_experts) =
        (floats(&test, "x"), ints(&test, "label"), floats(&test, "logits"), ints(&test, "experts"));
    let n = labels.len();
    let ref_pred: Vec<usize> = ref_logits.chunks_exact(CLASSES).map(argmax).collect();
    let ref_acc = ref_pred.iter().zip(&labels).filter(|(p, l)| p == l).count() as f64 / n as f64;

    let mut scratch = [0u8; SCRATCH];
    let mut results = Vec::new();
    for (dtype, bytes) in MODELS {
        let model = Model::parse(bytes).expect("valid model");
        let mut r = Result {
            dtype,
            accuracy: 0.0,
            agreement: 0.0,
            same_experts: 0.0,
            max_logit_err: 0.0,
            flash_bytes: bytes.len(),
            scratch_bytes: model.scratch_bytes(),
            usage: [[0; EXPERTS]; CLASSES],
            macs: 0,
            macs_dense: 0,
        };
        let (mut correct, mut agree, mut same) = (0, 0, 0);
        for i in 0..n {
            let mut y = [0.0f32; CLASSES];
            let mut chosen = 0;
            model
                .infer_observed(&x[i * 64..(i + 1) * 64], &mut y, &mut scratch, |s| {
                    chosen = s.selection[0].expert as usize;
                    r.macs += s.macs;
                    r.macs_dense += s.macs_dense;
                })
                .expect("inference");
            let pred = argmax(&y);
            correct += (pred == labels[i]) as usize;
            agree += (pred == ref_pred[i]) as usize;
            same += (chosen == ref_experts[i]) as usize;
            r.usage[labels[i]][chosen] += 1;
            for (a, b) in y.iter().zip(&ref_logits[i * CLASSES..(i + 1) * CLASSES]) {
                r.max_logit_err = r.max_logit_err.max((a - b).abs());
            }
        }
        r.accuracy = correct as f64 / n as f64;
        r.agreement = agree as f64 / n as f64;
        r.same_experts = same as f64 / n as f64;
        results.push(r);
    }

    let int8 = &results[2];
    let per = |v: u64| v / n as u64;
    if json_out {
        let dtypes: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|r| {
                let v = json!({
                    "accuracy": r.accuracy,
                    "agreement": r.agreement,
                    "same_experts": r.same_experts,
                    "max_logit_err": r.max_logit_err,
                    "flash_bytes": r.flash_bytes,
                    "scratch_bytes": r.scratch_bytes,
                });
                (r.dtype.to_string(), v)
            })
            .collect();
        let usage: Vec<Vec<u32>> = int8.usage.iter().map(|c| c.to_vec()).collect();
        let out = json!({
            "test_images": n,
            "reference_accuracy": ref_acc,
            "dtypes": dtypes,
            "macs_active": per(int8.macs),
            "macs_dense": per(int8.macs_dense),
            "flash_bytes": int8.flash_bytes,
            "scratch_bytes": int8.scratch_bytes,
            "expert_usage_per_class_int8": usage,
        });
        println!("{out}");
        return;
    }
    println!(
        "digits: Switch MoE classifier, 64 pixels -> 4 ReLU MLP experts (32 hidden) -> 10 classes, top-1"
    );
    println!("{n} held-out test images; PyTorch accuracy {:.2}%\n", 100.0 * ref_acc);
    println!(
        "dtype  accuracy  same answer as PyTorch  same expert  max |logit - PyTorch|  flash bytes  scratch bytes"
    );
    for r in &results {
        println!(
            "{:<6} {:>7.2}%  {:>21.1}%  {:>10.1}%  {:>21.2e}  {:>11}  {:>13}",
            r.dtype,
            100.0 * r.accuracy,
            100.0 * r.agreement,
            100.0 * r.same_experts,
            r.max_logit_err,
            r.flash_bytes,
            r.scratch_bytes
        );
    }
    println!("\nexpert usage per class (int8):");
    println!("class{}", (0..EXPERTS).map(|e| format!("{:>5}", format!("e{e}"))).collect::<String>());
    for (c, row) in int8.usage.iter().enumerate() {
        println!("{c:>5}{}", row.iter().map(|v| format!("{v:>5}")).collect::<String>());
    }
    println!(
        "\nMACs per inference: {} active vs {} dense ({:.2}x fewer); int8 model: {} bytes of flash, {} bytes of scratch RAM",
        per(int8.macs),
        per(int8.macs_dense),
        int8.macs_dense as f64 / int8.macs as f64,
        int8.flash_bytes,
        int8.scratch_bytes
    );
}
