//! The CUDA backend against the CPU batched path and PyTorch, on every
//! target this machine has: the CPU emulator of the kernels (any machine with
//! a C++20 compiler: CI) and GPU 0 (`bash tools/gpu-check.sh`). Without a GPU
//! the GPU half prints why and passes.
//!
//! Asserted: the same experts as the CPU and PyTorch; outputs within 1e-5 of
//! the CPU's and of PyTorch's (f32, relative to the token's largest output)
//! and, with f16 weights, within 1e-3 of the CPU's (the bound) and
//! 1e-5 of PyTorch run on the same f16-rounded weights; a batch of one gives
//! the same bits as the same token inside a batch.

mod common;

use std::sync::OnceLock;

use common::{Fixture, MOE_CASES, rel_err, to_f16, to_f32, with_layer};
use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::cuda::{CudaError, CudaMoe, Emulator, Precision, Target, available};
use micromoe::kernels::{Activation, FloatWeight};
use micromoe::{MoeLayer, Rule, Selection};

/// The PyTorch fixtures with gated SiLU experts: Mixtral, and Qwen2-MoE with
/// its sigmoid-gated shared expert (with and without `norm_topk_prob`).
fn cases() -> impl Iterator<Item = &'static str> {
    MOE_CASES.iter().copied().filter(|n| n.starts_with("mixtral") || n.starts_with("qwen2moe"))
}

fn emulator() -> Option<&'static Emulator> {
    static EMU: OnceLock<Result<Emulator, String>> = OnceLock::new();
    let made = EMU.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
        match Emulator::compile(&dir) {
            Ok(e) => Ok(e),
            // No C++ compiler at all: say so and test the rest (CI requires one).
            Err(CudaError::Compile(why))
                if why.ends_with("(os error 2)")
                    && std::env::var_os("MICROMOE_REQUIRE_EMULATOR").is_none() =>
            {
                Err(why)
            }
            Err(e) => panic!("the CUDA emulator does not compile: {e}"),
        }
    });
    match made {
        Ok(e) => Some(e),
        Err(why) => {
            println!("emulator skipped: no C++ compiler ({why})");
            None
        }
    }
}

/// Every target present, with its name.
fn targets() -> Vec<(&'static str, Target<'static>)> {
    let mut t = Vec::new();
    if let Some(emu) = emulator() {
        t.push(("emulator", Target::Emulator(emu)));
    }
    match available() {
        Ok(()) => t.push(("GPU", Target::Gpu)),
        Err(e) => println!("GPU skipped: {e}"),
    }
    t
}

fn experts(sel: &[Selection<f32>]) -> Vec<Vec<u16>> {
    sel.iter().map(|s| s.iter().map(|c| c.expert).collect()).collect()
}

/// Runs `xs` on `target` and the CPU's `infer_batch`; checks the experts and
/// batch invariance; returns the device's output and the worst error
/// relative to the CPU's, per token.
fn compare<W: FloatWeight + Sync>(
    target: Target<'_>,
    layer: &MoeLayer<'_, W, W>,
    precision: Precision,
    xs: &[f32],
) -> (Vec<f32>, Vec<Vec<u16>>, f32) {
    let d = layer.in_dim();
    let (mut cpu, mut dev_out) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
    let cpu_sel = layer.infer_batch(xs, &mut cpu, 1).unwrap();
    let dev = CudaMoe::on(target, layer, precision).unwrap();
    let dev_sel = dev.infer_batch(xs, &mut dev_out).unwrap();
    assert_eq!(experts(&dev_sel), experts(&cpu_sel), "experts differ from the CPU's");
    for (t, x) in xs.chunks_exact(d).enumerate().step_by(xs.len() / d / 3 + 1) {
        let mut one = vec![0.0; d];
        dev.infer_batch(x, &mut one).unwrap();
        assert_eq!(one, dev_out[t * d..(t + 1) * d], "token {t}: a batch of one differs");
    }
    let err =
        cpu.chunks_exact(d).zip(dev_out.chunks_exact(d)).map(|(c, g)| rel_err(g, c)).fold(0.0, f32::max);
    (dev_out, experts(&dev_sel), err)
}

fn fixture_tokens(fx: &Fixture) -> Vec<f32> {
    (0..fx.tokens()).flat_map(|t| fx.row("x", t).to_vec()).collect()
}

/// PyTorch's experts and the device's largest error against `key`.
fn vs_pytorch(fx: &Fixture, out: &[f32], chosen: &[Vec<u16>], experts_key: &str, key: &str) -> f32 {
    let d = fx.hidden();
    let mut worst = 0.0f32;
    for t in 0..fx.tokens() {
        assert_eq!(chosen[t], fx.experts_row(experts_key, t), "{} token {t}: experts vs PyTorch", fx.name);
        worst = worst.max(rel_err(&out[t * d..(t + 1) * d], fx.row(key, t)));
    }
    worst
}

/// Every fixture on every target in `precision`: against the CPU (`cpu_limit`)
/// and PyTorch run on the same weights (1e-5).
fn fixtures_match(precision: Precision, cpu_limit: f32) {
    for (target_name, target) in targets() {
        for name in cases() {
            let fx = Fixture::load(name);
            let xs = fixture_tokens(&fx);
            let ((out, chosen, err), keys) = match precision {
                Precision::F32 => {
                    (with_layer(&fx, to_f32, |l| compare(target, l, precision, &xs)), ["experts", "y"])
                }
                Precision::F16 => (
                    with_layer(&fx, to_f16, |l| compare(target, l, precision, &xs)),
                    ["experts_f16w", "y_f16w"],
                ),
            };
            let torch = vs_pytorch(&fx, &out, &chosen, keys[0], keys[1]);
            println!(
                "{target_name} {name} {precision:?}: max relative error vs CPU {err:.2e}, vs PyTorch {torch:.2e}"
            );
            assert!(err <= cpu_limit && torch <= 1e-5, "{name}: {err:e} {torch:e}");
        }
    }
}

#[test]
fn f32_matches_the_cpu_and_pytorch() {
    fixtures_match(Precision::F32, 1e-5);
}

/// PyTorch ran the f16-rounded weights in f32.
#[test]
fn f16_matches_the_cpu_and_pytorch() {
    fixtures_match(Precision::F16, 1e-3);
}

fn values(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// A layer and tokens whose shapes cut the grouped GEMM's tiles everywhere:
/// more than 64 entries for some experts (several row tiles), widths that are
/// not multiples of the 64-output and 16-input tiles, an expert nobody picks
/// (the fifth).
fn tile_edge_layer(tokens: usize) -> (MoeBuf<f32>, Vec<f32>) {
    let (d, h, e) = (40, 72, 5);
    let mut seed = 11;
    let lin = |r, c, s: &mut u64| LinearBuf::new(values(r * c, s, 0.5), None, r, c);
    let experts: Vec<ExpertBuf<f32>> = (0..e)
        .map(|_| {
            ExpertBuf::gated(
                lin(h, d, &mut seed),
                lin(h, d, &mut seed),
                lin(d, h, &mut seed),
                Activation::Silu,
            )
        })
        .collect();
    let mut gate = values(e * d, &mut seed, 0.5);
    gate[4 * d..].iter_mut().for_each(|g| *g = -50.0 * g.abs() - 1.0);
    let moe = MoeBuf::new(LinearBuf::new(gate, None, e, d), experts, Rule::mixtral(e, 2));
    let xs: Vec<f32> = values(tokens * d, &mut seed, 2.0).iter().map(|v| v.abs() + 0.01).collect();
    (moe, xs)
}

#[test]
fn tile_edges_match_the_cpu() {
    let (moe, xs) = tile_edge_layer(150);
    let views = moe.expert_views().unwrap();
    let layer = moe.layer(&views).unwrap();
    for (target_name, target) in targets() {
        let (_, chosen, err) = compare(target, &layer, Precision::F32, &xs);
        let mut per_expert = vec![0; 5];
        chosen.iter().flatten().for_each(|&x| per_expert[x as usize] += 1);
        println!(
            "{target_name} tile edges: entries per expert {per_expert:?}, max relative error vs CPU {err:.2e}"
        );
        assert!(per_expert.iter().any(|&n| n > 64) && per_expert[4] == 0, "{per_expert:?}");
        assert!(err <= 1e-5, "{err:e}");
    }
}

/// The kernels under the thread sanitizer: the threads of each block run
/// concurrently, so shared memory used without the barriers it needs shows
/// up as a data race (the emulator then stops and the launch fails). Both
/// weight types, routed and shared experts, tile edges.
#[test]
fn kernels_have_no_data_races() {
    if emulator().is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator-tsan");
    let emu = Emulator::compile_race_check(&dir).expect("the thread-sanitizer emulator compiles");
    let (moe, xs) = tile_edge_layer(70);
    let views = moe.expert_views().unwrap();
    let layer = moe.layer(&views).unwrap();
    let (_, _, err) = compare(Target::Emulator(&emu), &layer, Precision::F32, &xs);
    assert!(err <= 1e-5, "{err:e}");
    let fx = Fixture::load("qwen2moe_h32_e8_k2");
    let xs = fixture_tokens(&fx);
    let (_, _, err) = with_layer(&fx, to_f16, |l| compare(Target::Emulator(&emu), l, Precision::F16, &xs));
    assert!(err <= 1e-3, "{err:e}");
    println!("thread sanitizer: no races reported");
}

/// DeepSeek-V3-style routing: sigmoid scores, group-limited top-k, a
/// selection bias, routed scaling, and an ungated shared expert of its own
/// width.
#[test]
fn deepseek_style_layer_matches_the_cpu() {
    let (d, h, hs, e, tokens) = (24, 40, 56, 8, 37);
    let mut seed = 5;
    let lin = |r, c, s: &mut u64| LinearBuf::new(values(r * c, s, 0.6), None, r, c);
    let mut swiglu = |h| {
        ExpertBuf::gated(lin(h, d, &mut seed), lin(h, d, &mut seed), lin(d, h, &mut seed), Activation::Silu)
    };
    let experts: Vec<ExpertBuf<f32>> = (0..e).map(|_| swiglu(h)).collect();
    let shared = swiglu(hs);
    let mut moe = MoeBuf::new(lin(e, d, &mut seed), experts, Rule::deepseek_v3(e, 3, 4, 2, true));
    moe.shared = Some((shared, None));
    moe.bias = Some(values(e, &mut seed, 0.4));
    moe.scaling = 2.5;
    let views = moe.expert_views().unwrap();
    let layer = moe.layer(&views).unwrap();
    let xs = values(tokens * d, &mut seed, 3.0);
    for (target_name, target) in targets() {
        let (_, _, err) = compare(target, &layer, Precision::F32, &xs);
        println!("{target_name} DeepSeek-style: max relative error vs CPU {err:.2e}");
        assert!(err <= 1e-5, "{err:e}");
    }
}

/// A model read from `.moe` bytes runs on the device as the CPU runs it,
/// gates and experts stored in either type.
#[test]
fn layers_of_a_moe_file_run_on_the_device() {
    use micromoe::format::LayerDtype;
    use micromoe::format::write::AlignedBytes;
    use micromoe::model::Layer;
    use micromoe::model::write::{LayerSpec, ModelSpec, Task, write};
    let (f32_, f16_) = (LayerDtype::F32, LayerDtype::F16);
    for (target_name, target) in targets() {
        for (gate, experts_dtype) in [(f32_, f32_), (f16_, f16_), (f32_, f16_), (f16_, f32_)] {
            let fx = Fixture::load("mixtral_h32_e8_k2");
            let spec = ModelSpec::stack(
                Task::Regress,
                vec![LayerSpec::Float { layer: common::model(&fx), gate, experts: experts_dtype }],
            );
            let bytes = AlignedBytes::from(&write(&spec).unwrap()[..]);
            let model = micromoe::Model::parse(&bytes).unwrap();
            let dev = CudaMoe::from_model_on(target, &model, 0).unwrap();
            let xs = fixture_tokens(&fx);
            let (mut cpu, mut out) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
            let dev_sel = dev.infer_batch(&xs, &mut out).unwrap();
            let cpu_sel = match model.layer(0).unwrap() {
                Layer::F32(l) => l.infer_batch(&xs, &mut cpu, 1).unwrap(),
                Layer::F16(l) => l.infer_batch(&xs, &mut cpu, 1).unwrap(),
                Layer::F32GateF16(l) => l.infer_batch(&xs, &mut cpu, 1).unwrap(),
                Layer::F16GateF32(l) => l.infer_batch(&xs, &mut cpu, 1).unwrap(),
                _ => unreachable!(),
            };
            assert_eq!(experts(&dev_sel), experts(&cpu_sel), "gate {gate:?}, experts {experts_dtype:?}");
            let err = rel_err(&out, &cpu);
            println!(
                "{target_name} from_model gate {gate:?} experts {experts_dtype:?}: max relative error vs CPU {err:.2e}"
            );
            assert!(err <= 1e-5, "{err:e}");
        }
    }
}

/// Bad input gets the CPU path's errors, not a launch.
#[test]
fn bad_input_is_refused() {
    for (_, target) in targets() {
        let fx = Fixture::load("qwen2moe_h32_e8_k2");
        with_layer(&fx, to_f32, |layer| {
            let dev = CudaMoe::on(target, layer, Precision::F32).unwrap();
            let d = layer.in_dim();
            let mut out = vec![0.0; 2 * d];
            let mut xs = vec![0.5; 2 * d];
            assert!(matches!(dev.infer_batch(&xs[..d + 1], &mut out[..d + 1]), Err(CudaError::Model(_))));
            assert!(matches!(dev.infer_batch(&xs, &mut out[..d]), Err(CudaError::Model(_))));
            assert!(matches!(dev.infer_batch(&[], &mut []), Err(CudaError::Model(_))));
            xs[d + 3] = f32::NAN;
            assert!(matches!(dev.infer_batch(&xs, &mut out), Err(CudaError::Model(_))));
        });
    }
}

#[test]
fn without_a_gpu_the_errors_are_clear() {
    match available() {
        Ok(()) => println!("a GPU is present: nothing to check here"),
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice | CudaError::NoNvrtc)) => {
            let fx = Fixture::load("mixtral_h16_e4_k1");
            let made = with_layer(&fx, to_f32, |layer| CudaMoe::new(layer, Precision::F32).map(|_| ()));
            assert!(
                matches!(made, Err(CudaError::NoDriver | CudaError::NoDevice | CudaError::NoNvrtc)),
                "{e}"
            );
            println!("refused as expected: {e}");
        }
        Err(e) => panic!("unexpected: {e}"),
    }
}
