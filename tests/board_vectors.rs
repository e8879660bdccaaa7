//! The host's answers for the firmware checks under `boards/`: the first 32
//! digits test images run through each committed model on the host. The
//! boards must reproduce them (integer paths bit for bit). This test keeps
//! the committed vectors in step with the host; regenerate them with
//! `MICROMOE_BLESS=1 cargo test --test board_vectors`.
//!
//! Layout (little-endian): magic `MMVEC1\0\0`, u32 samples, u32 input
//! width, u32 output width, u32 reserved, then inputs (f32), outputs (f32),
//! and the first chosen expert of each sample (u32).

use micromoe::format::Model;
use micromoe::include_model;
use safetensors::SafeTensors;

mod tensors;
use tensors::f32s;

const SAMPLES: usize = 32;
const MODELS: [(&str, &[u8]); 4] = [
    ("f32", include_model!("../models/digits/digits_f32.moe")),
    ("f16", include_model!("../models/digits/digits_f16.moe")),
    ("int8", include_model!("../models/digits/digits_int8.moe")),
    ("q15", include_model!("../models/digits/digits_q15.moe")),
];

fn vectors(model: &Model<'_>, x: &[f32]) -> Vec<u8> {
    let (n_in, n_out) = (model.input_dim(), model.output_dim());
    let mut out = b"MMVEC1\0\0".to_vec();
    for v in [SAMPLES, n_in, n_out, 0] {
        out.extend((v as u32).to_le_bytes());
    }
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let (mut ys, mut experts) = (Vec::new(), Vec::new());
    for xi in x.chunks_exact(n_in).take(SAMPLES) {
        out.extend(xi.iter().flat_map(|v| v.to_le_bytes()));
        let mut y = vec![0.0f32; n_out];
        let mut first = 0u32;
        model.infer(xi, &mut y, &mut scratch, |s| first = s.selection[0].expert as u32).unwrap();
        ys.extend(y);
        experts.push(first);
    }
    out.extend(ys.iter().flat_map(|v| v.to_le_bytes()));
    out.extend(experts.iter().flat_map(|v| v.to_le_bytes()));
    out
}

#[test]
fn board_vectors_match_the_host() {
    let test = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/test.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&test).unwrap();
    let x = f32s(&st, "x");
    let bless = std::env::var_os("MICROMOE_BLESS").is_some();
    for (dtype, bytes) in MODELS {
        let want = vectors(&Model::parse(bytes).unwrap(), &x);
        let path = format!("{}/boards/vectors/digits_{dtype}.bin", env!("CARGO_MANIFEST_DIR"));
        if bless {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(have == want, "{path} is stale: run MICROMOE_BLESS=1 cargo test --test board_vectors");
    }
}
