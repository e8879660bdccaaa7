//! Multi-gate MoE: two task gates over one expert pool, against PyTorch.

use std::path::Path;

use micromoe::Model;
use micromoe::format::layout;
use micromoe::format::write::AlignedBytes;
use micromoe::host::{Dtype, convert};
use safetensors::SafeTensors;

mod tensors;
use tensors::{f32s, i64s};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mmoe");

struct Reference {
    x: Vec<f32>,
    y: Vec<f32>,
    experts_task1: Vec<i64>,
}

fn reference() -> Reference {
    let bytes = std::fs::read(format!("{DIR}/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    Reference { x: f32s(&st, "x"), y: f32s(&st, "y"), experts_task1: i64s(&st, "experts_task1") }
}

/// Largest error relative to the largest reference output, and whether task 1 chose PyTorch's experts.
fn run(dtype: Dtype) -> (f32, usize, usize) {
    let r = reference();
    let calibration = Path::new(DIR).join("reference.safetensors");
    let bytes = convert(Path::new(DIR), dtype, None, Some(&calibration)).unwrap();
    let aligned = AlignedBytes::from(&bytes[..]);
    let model = Model::parse(&aligned).unwrap();
    assert_eq!((model.tasks(), model.layers(), model.input_dim(), model.output_dim()), (2, 4, 16, 4));
    // The pool is stored once, under layer 0; task 1's gate layer holds only its gate.
    let table = model.table();
    let pool_entries = |layer| {
        (0..table.len())
            .filter_map(|i| table.get(i))
            .filter(|t| t.key.layer == layer && t.key.expert < 4)
            .count()
    };
    assert!(pool_entries(0) > 0);
    assert_eq!(pool_entries(2), 0);
    let scale = r.y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let (mut worst, mut same) = (0.0f32, 0);
    for (t, x) in r.x.chunks_exact(16).enumerate() {
        let mut y = [0.0f32; 4];
        let mut task1 = vec![];
        model
            .infer_observed(x, &mut y, &mut scratch, |s| {
                if s.layer == 2 {
                    task1 = s.selection.iter().map(|c| c.expert as i64).collect();
                }
            })
            .unwrap();
        for (a, b) in y.iter().zip(&r.y[t * 4..t * 4 + 4]) {
            worst = worst.max((a - b).abs() / scale);
        }
        same += (task1 == r.experts_task1[t * 2..t * 2 + 2]) as usize;
    }
    (worst, same, r.x.len() / 16)
}

#[test]
fn float_mmoe_matches_pytorch() {
    let (err, same, n) = run(Dtype::F32);
    println!("mmoe f32: max error {err:e} of the largest output; task 1 experts {same}/{n}");
    assert!(err <= 1e-5, "{err}");
    assert_eq!(same, n);
    let (err, _, _) = run(Dtype::F16);
    println!("mmoe f16: max error {err:e}");
    assert!(err <= 2e-3, "{err}");
}

#[test]
fn quantized_mmoe_stays_close() {
    // The derived element-wise bound is tested on single layers in quantized_parity.rs;
    // here: the whole two-task model stays within a few percent.
    for (dtype, limit) in [(Dtype::Int8, 0.02), (Dtype::Q15, 0.01)] {
        let (err, same, n) = run(dtype);
        println!("mmoe {dtype:?}: max error {err:e} of the largest output; task 1 experts {same}/{n}");
        assert!(err <= limit, "{dtype:?}: {err}");
        assert!(same + 2 >= n, "{dtype:?}: {same}/{n}");
    }
}

#[test]
fn sharing_experts_with_a_different_pool_is_refused() {
    let bytes = convert(Path::new(DIR), Dtype::F32, None, None).unwrap();
    // Point task 1's gate layer (layer 2) at layer 1, the task-0 tower: other experts.
    let mut b = bytes.clone();
    let at = layout::HEADER_LEN + 2 * layout::LAYER_LEN + 21 * 4;
    b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
    assert!(layout::seal(&mut b));
    let aligned = AlignedBytes::from(&b[..]);
    assert!(matches!(
        Model::parse(&aligned),
        Err(micromoe::Error::BadField { field: micromoe::error::Field::Routing, layer: 2 })
    ));
}
