//! Cargo features per numeric type and graph: a build pays only for what its
//! models use, and a model that needs a part the build leaves out is refused
//! at parse with the feature's name, never run by a wrong path.
//!
//! CI runs this test with the default features (everything) and again with
//! `--no-default-features --features alloc,int8` and `alloc,f32`.

use micromoe::error::Error;
use micromoe::{Model, include_model};

const MODELS: [(&str, &[u8]); 5] = [
    ("f32", include_model!("../models/digits/digits_f32.moe")),
    ("f16", include_model!("../models/digits/digits_f16.moe")),
    ("int8", include_model!("../models/digits/digits_int8.moe")),
    ("q15", include_model!("../models/digits/digits_q15.moe")),
    ("decoder", include_model!("../models/tinylm/tinylm_int8.moe")),
];

fn enabled(feature: &str) -> bool {
    match feature {
        "f32" => cfg!(feature = "f32"),
        "f16" => cfg!(feature = "f16"),
        "int8" => cfg!(feature = "int8"),
        "q15" => cfg!(feature = "q15"),
        _ => cfg!(feature = "decoder"),
    }
}

#[test]
fn a_model_needing_a_left_out_feature_is_refused_by_name() {
    for (feature, bytes) in MODELS {
        let parsed = if feature == "decoder" {
            micromoe::model::Decoder::parse(bytes).map(|_| ())
        } else {
            Model::parse(bytes).map(|model| {
                let mut scratch = vec![0u8; model.scratch_bytes()];
                let mut y = vec![0.0f32; model.output_dim()];
                let x = vec![0.5f32; model.input_dim()];
                model.infer(&x, &mut y, &mut scratch).unwrap();
            })
        };
        match parsed {
            Ok(()) => assert!(enabled(feature), "{feature} model parsed without its feature"),
            Err(e) => {
                assert!(!enabled(feature), "{feature}: {e}");
                assert_eq!(e, Error::Disabled { feature });
            }
        }
    }
}
