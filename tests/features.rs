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
        "mmoe" => cfg!(feature = "mmoe"),
        "shared" => cfg!(feature = "shared"),
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

/// Writes `spec` (the writer parses back what it wrote): with every
/// feature of `needs` on, the model parses and runs; otherwise it is
/// refused naming the first one left out, in the order parse checks them.
fn runs_or_is_refused(spec: &micromoe::model::write::ModelSpec, needs: &[&'static str]) {
    match micromoe::model::write::write(spec) {
        Ok(bytes) => {
            assert!(needs.iter().all(|f| enabled(f)), "written without one of {needs:?}");
            let bytes = micromoe::format::write::AlignedBytes::from(&bytes[..]);
            let model = Model::parse(&bytes).unwrap();
            let mut scratch = vec![0u8; model.scratch_bytes()];
            let mut y = vec![0.0f32; model.output_dim()];
            let x: Vec<f32> = (0..model.input_dim()).map(|i| i as f32 + 1.0).collect();
            model.infer(&x, &mut y, &mut scratch).unwrap();
        }
        Err(e) => {
            let missing = needs.iter().find(|f| !enabled(f));
            assert_eq!(Some(e), missing.map(|&feature| Error::Disabled { feature }));
        }
    }
}

/// A float layer of two ReLU experts over 2 inputs, 1 output.
fn float_layer(gate: f32, shared: bool) -> micromoe::model::write::LayerSpec {
    use micromoe::Rule;
    use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
    use micromoe::format::LayerDtype;
    use micromoe::kernels::Activation;
    let lin = |v: f32, rows, cols| LinearBuf::new(vec![v; rows * cols], None, rows, cols);
    let expert = |v: f32| ExpertBuf::mlp(lin(v, 4, 2), lin(0.25, 1, 4), Activation::Relu);
    let mut layer = MoeBuf::new(lin(gate, 2, 2), vec![expert(0.5), expert(-0.5)], Rule::switch(2));
    if shared {
        layer.shared = Some((expert(0.125), None));
    }
    micromoe::model::write::LayerSpec::Float { layer, gate: LayerDtype::F32, experts: LayerDtype::F32 }
}

/// Multi-gate MoE is the `mmoe` feature's: without it the writer's own
/// read-back (and any parse) refuses such a model by name.
#[test]
fn a_multi_gate_model_needs_mmoe() {
    use micromoe::model::write::{ModelSpec, Task};
    // Two tasks over one pool of experts (layer 1 routes over layer 0's).
    let spec = ModelSpec {
        task: Task::Regress,
        layers: vec![float_layer(1.0, false), float_layer(-1.0, false)],
        multi_gate: Some(2),
        experts_from: vec![0, 0],
    };
    // The architecture is checked before the layers' types.
    runs_or_is_refused(&spec, &["mmoe", "f32"]);
}

/// A layer with an always-on shared expert (Qwen-MoE / DeepSeek style) is
/// the `shared` feature's: without it such a model is refused by name.
#[test]
fn a_shared_expert_model_needs_shared() {
    use micromoe::model::write::{ModelSpec, Task};
    let spec = ModelSpec::stack(Task::Regress, vec![float_layer(1.0, true)]);
    // A layer's types are checked before its shared expert.
    runs_or_is_refused(&spec, &["f32", "shared"]);
}
