//! f32 and f16 layers against Hugging Face transformers' Mixtral and
//! Qwen2-MoE sparse MoE blocks, and the router against DeepSeek-V3's.

mod common;

use common::{Fixture, MOE_CASES, rel_err, to_f16, to_f32, with_layer};
use micromoe::router::{IntRouter, LOGIT_FRAC_BITS, ONE_Q15, Rule};
use micromoe::{Router, Selection, Stats};

#[test]
fn f32_layers_match_pytorch() {
    let mut worst = 0.0f32;
    for name in MOE_CASES {
        let fx = Fixture::load(name);
        with_layer(&fx, to_f32, |layer| {
            let mut scratch = vec![0u8; layer.scratch_bytes()];
            let mut y = vec![0.0; layer.out_dim()];
            let mut stats = Stats::<8>::new();
            for t in 0..fx.tokens() {
                let sel = layer.infer_with_stats(fx.row("x", t), &mut y, &mut scratch, &mut stats).unwrap();
                let chosen: Vec<u16> = sel.iter().map(|c| c.expert).collect();
                assert_eq!(chosen, fx.experts_row("experts", t), "{name} token {t}: experts");
                for (c, &w) in sel.iter().zip(fx.row("weights", t)) {
                    assert!((c.weight - w).abs() <= 1e-6, "{name} token {t}: weight {} vs {w}", c.weight);
                }
                let err = rel_err(&y, fx.row("y", t));
                assert!(err <= 1e-5, "{name} token {t}: relative error {err:e}");
                worst = worst.max(err);
            }
            assert_eq!(stats.tokens as usize, fx.tokens());
            assert_eq!(stats.counts.iter().sum::<u32>() as usize, fx.tokens() * fx.meta("k"));
            assert!(stats.macs < stats.macs_dense);
        });
    }
    println!("f32: largest relative error {worst:e} over {} cases", MOE_CASES.len());
}

#[test]
fn f16_layers_match_pytorch() {
    let (mut worst_same, mut worst_f32) = (0.0f32, 0.0f32);
    for name in MOE_CASES {
        let fx = Fixture::load(name);
        with_layer(&fx, to_f16, |layer| {
            let mut scratch = vec![0u8; layer.scratch_bytes()];
            let mut y = vec![0.0; layer.out_dim()];
            for t in 0..fx.tokens() {
                let sel = layer.infer(fx.row("x", t), &mut y, &mut scratch).unwrap();
                let chosen: Vec<u16> = sel.iter().map(|c| c.expert).collect();
                // Same weights rounded to f16, evaluated by PyTorch in f32.
                assert_eq!(chosen, fx.experts_row("experts_f16w", t), "{name} token {t}: experts");
                let same = rel_err(&y, fx.row("y_f16w", t));
                assert!(same <= 1e-5, "{name} token {t}: vs f16-rounded PyTorch {same:e}");
                // Against the f32 block: the cost of f16 weights.
                if chosen == fx.experts_row("experts", t) {
                    let err = rel_err(&y, fx.row("y", t));
                    assert!(err <= 2e-3, "{name} token {t}: vs f32 PyTorch {err:e}");
                    worst_f32 = worst_f32.max(err);
                }
                worst_same = worst_same.max(same);
            }
        });
    }
    println!("f16: largest relative error {worst_same:e} (same weights), {worst_f32:e} (vs f32)");
}

fn deepseek(name: &str) -> (Fixture, Rule) {
    let fx = Fixture::load(name);
    let rule = Rule::deepseek_v3(
        fx.meta("experts"),
        fx.meta("k"),
        fx.meta("n_group"),
        fx.meta("topk_group"),
        fx.meta("norm_topk_prob") == 1,
    );
    (fx, rule)
}

const DEEPSEEK_CASES: &[&str] = &["deepseek_router_e16_g4", "deepseek_router_e8_g1"];

#[test]
fn deepseek_v3_router_matches_pytorch() {
    for name in DEEPSEEK_CASES {
        let (fx, rule) = deepseek(name);
        let router = Router::new(rule, Some(fx.f32("bias")), fx.meta_f32("scale")).unwrap();
        let mut sel = Selection::new();
        for t in 0..fx.tokens() {
            router.route(fx.row("logits", t), &mut sel).unwrap();
            let chosen: Vec<u16> = sel.iter().map(|c| c.expert).collect();
            assert_eq!(chosen, fx.experts_row("experts", t), "{name} token {t}");
            for (c, &w) in sel.iter().zip(fx.row("weights", t)) {
                assert!(
                    (c.weight - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{name} token {t}: {} vs {w}",
                    c.weight
                );
            }
        }
    }
}

/// The integer router on logits quantized to `2^-12`: same experts whenever
/// the float choice is not within the quantization error of a tie
/// (`2^-12` per logit, so a margin of `2^-11`), weights within a few Q15 steps.
#[test]
fn integer_router_matches_pytorch_routing() {
    let mut checked = 0;
    let mut run = |name: &str, rule: Rule, bias: Option<Vec<i32>>, scale: f32, weights: &str| {
        let fx = Fixture::load(name);
        let scale_q15 = (scale * ONE_Q15 as f32).round() as i32;
        let router = IntRouter::new(rule, bias.as_deref(), scale_q15).unwrap();
        let mut sel = Selection::new();
        for t in 0..fx.tokens() {
            let logits = fx.row("logits", t);
            let q: Vec<i32> =
                logits.iter().map(|&l| (l * (1 << LOGIT_FRAC_BITS) as f32).round() as i32).collect();
            router.route(&q, &mut sel).unwrap();
            let want = fx.experts_row("experts", t);
            let chosen: Vec<u16> = sel.iter().map(|c| c.expert).collect();
            if chosen != want {
                // Only a near-tie may flip: the k-th and the next logit.
                let mut sorted: Vec<f32> = logits.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let k = rule.k;
                let margin = if k < sorted.len() { sorted[k - 1] - sorted[k] } else { f32::INFINITY };
                assert!(margin <= 2.0 / 4096.0 || bias.is_some(), "{name} token {t}: {chosen:?} vs {want:?}");
                continue;
            }
            for (c, &w) in sel.iter().zip(fx.row(weights, t)) {
                let got = c.weight as f32 / ONE_Q15 as f32;
                assert!(
                    (got - w).abs() <= 4.0 / ONE_Q15 as f32 * scale.max(1.0),
                    "{name} token {t}: {got} vs {w}"
                );
            }
            checked += 1;
        }
    };
    for name in MOE_CASES {
        let rule = Fixture::load(name).rule();
        run(name, rule, None, 1.0, "weights");
    }
    for name in DEEPSEEK_CASES {
        let (fx, rule) = deepseek(name);
        let bias = fx.f32("bias").iter().map(|&b| (b * ONE_Q15 as f32).round() as i32).collect();
        run(name, rule, Some(bias), fx.meta_f32("scale"), "weights");
    }
    assert!(checked > 300, "{checked}");
}
