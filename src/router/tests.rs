use super::*;

fn experts(sel: &Selection<impl Copy>) -> heapless::Vec<u16, MAX_K> {
    sel.iter().map(|c| c.expert).collect()
}

fn route(rule: Rule, logits: &[f32]) -> Selection<f32> {
    let mut sel = Selection::new();
    Router::new(rule, None, 1.0).unwrap().route(logits, &mut sel).unwrap();
    sel
}

fn route_int(rule: Rule, logits: &[f32]) -> Selection<i32> {
    let q: heapless::Vec<i32, 64> =
        logits.iter().map(|&l| libm::roundf(l * (1 << LOGIT_FRAC_BITS) as f32) as i32).collect();
    let mut sel = Selection::new();
    IntRouter::new(rule, None, ONE_Q15).unwrap().route(&q, &mut sel).unwrap();
    sel
}

#[test]
fn ties_prefer_lower_index_in_both_routers() {
    let logits = [1.0, 3.0, 3.0, 0.0, 3.0];
    assert_eq!(experts(&route(Rule::mixtral(5, 2), &logits)), [1, 2]);
    assert_eq!(experts(&route_int(Rule::mixtral(5, 2), &logits)), [1, 2]);
    let sel = route(Rule::mixtral(5, 2), &logits);
    assert_eq!(sel[0].weight, 0.5);
    let sel = route_int(Rule::mixtral(5, 2), &logits);
    assert_eq!(sel[0].weight, ONE_Q15 / 2);
}

#[test]
fn all_equal_logits_pick_the_first_k_evenly() {
    for k in 1..=4 {
        let sel = route(Rule::qwen2_moe(4, k, false), &[0.7; 4]);
        assert_eq!(experts(&sel).as_slice(), &[0u16, 1, 2, 3][..k]);
        assert!(sel.iter().all(|c| (c.weight - 0.25).abs() < 1e-7));
        let sel = route_int(Rule::qwen2_moe(4, k, false), &[0.7; 4]);
        assert!(sel.iter().all(|c| c.weight == ONE_Q15 / 4));
    }
}

#[test]
fn k_equal_to_expert_count_sorts_everything() {
    let logits = [0.1, -2.0, 5.0, 0.3, 0.3, -1.0, 2.0, 0.0];
    let sel = route(Rule::mixtral(8, 8), &logits);
    assert_eq!(experts(&sel), [2, 6, 3, 4, 0, 7, 5, 1]);
    let total: f32 = sel.iter().map(|c| c.weight).sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert_eq!(experts(&route_int(Rule::mixtral(8, 8), &logits)), [2, 6, 3, 4, 0, 7, 5, 1]);
}

#[test]
fn nan_ranks_last_and_never_yields_nan_weights() {
    let logits = [f32::NAN, 1.0, f32::NAN, 0.5];
    let sel = route(Rule::mixtral(4, 3), &logits);
    assert_eq!(experts(&sel), [1, 3, 0]);
    assert_eq!(sel[2].weight, 0.0);
    for rule in [
        Rule::switch(4),
        Rule::mixtral(4, 2),
        Rule::qwen2_moe(4, 4, false),
        Rule::deepseek_v3(4, 2, 2, 1, true),
    ] {
        for logits in [[f32::NAN; 4], [f32::INFINITY; 4], [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0]] {
            let sel = route(rule, &logits);
            assert_eq!(sel.len(), rule.k);
            assert!(
                sel.iter().all(|c| c.weight.is_finite() && c.weight >= 0.0),
                "{rule:?} {logits:?} {sel:?}"
            );
        }
    }
    // All NaN: behaves as all-equal.
    assert_eq!(experts(&route(Rule::mixtral(4, 2), &[f32::NAN; 4])), [0, 1]);
    // +inf wins outright.
    let sel = route(Rule::mixtral(4, 2), &[0.0, f32::INFINITY, 3.0, 1.0]);
    assert_eq!((sel[0].expert, sel[0].weight, sel[1].weight), (1, 1.0, 0.0));
}

#[test]
fn switch_weight_is_the_full_softmax_probability() {
    let logits = [1.0f32, 2.0, 0.0];
    let sel = route(Rule::switch(3), &logits);
    let p = libm::expf(2.0) / (libm::expf(0.0) + libm::expf(1.0) + libm::expf(2.0));
    assert_eq!(sel[0].expert, 1);
    assert!((sel[0].weight - p).abs() < 1e-6);
    let w = route_int(Rule::switch(3), &logits)[0].weight;
    assert!((w as f32 / ONE_Q15 as f32 - p).abs() < 1.0 / ONE_Q15 as f32);
}

#[test]
fn selection_bias_changes_choice_not_weight() {
    let rule = Rule::deepseek_v3(4, 1, 1, 1, false);
    let bias = [0.0, 0.0, 0.0, 0.9];
    let mut sel = Selection::new();
    Router::new(rule, Some(&bias), 2.5).unwrap().route(&[1.0, 0.0, 0.0, -1.0], &mut sel).unwrap();
    assert_eq!(sel[0].expert, 3);
    assert!((sel[0].weight - 2.5 * sigmoid(-1.0)).abs() < 1e-6);
}

#[test]
fn invalid_rules_are_refused() {
    assert_eq!(Router::new(Rule::mixtral(4, 0), None, 1.0).unwrap_err(), Error::TopK { k: 0, experts: 4 });
    assert!(Router::new(Rule::mixtral(4, 5), None, 1.0).is_err());
    assert!(Router::new(Rule::mixtral(16, 9), None, 1.0).is_err());
    assert!(Router::new(Rule::deepseek_v3(6, 2, 4, 2, true), None, 1.0).is_err());
    assert!(Router::new(Rule::deepseek_v3(8, 3, 4, 1, true), None, 1.0).is_err());
    assert!(Router::new(Rule::mixtral(4, 2), Some(&[0.0; 3]), 1.0).is_err());
    assert!(Router::new(Rule::mixtral(4, 2), Some(&[0.0, f32::NAN, 0.0, 0.0]), 1.0).is_err());
    assert!(Router::new(Rule::mixtral(4, 2), None, f32::INFINITY).is_err());
    let r = Router::new(Rule::mixtral(4, 2), None, 1.0).unwrap();
    assert!(r.route(&[0.0; 3], &mut Selection::new()).is_err());
}

#[test]
fn integer_router_tracks_float_router() {
    // A deterministic spread of logits; weights agree to a few Q15 steps.
    let mut seed = 12345u32;
    let mut next = || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1 << 24) as f32 * 8.0 - 4.0
    };
    for rule in [
        Rule::switch(8),
        Rule::mixtral(8, 2),
        Rule::qwen2_moe(8, 3, false),
        Rule::deepseek_v3(8, 2, 4, 2, true),
    ] {
        let (mut same, mut near_ties) = (0, 0);
        for _ in 0..200 {
            let logits: heapless::Vec<f32, 8> = (0..8).map(|_| next()).collect();
            let f = route(rule, &logits);
            let i = route_int(rule, &logits);
            if experts(&f) == experts(&i) {
                same += 1;
                for (a, b) in f.iter().zip(&i) {
                    assert!((a.weight - b.weight as f32 / 32768.0).abs() < 4e-4, "{rule:?} {a:?} {b:?}");
                }
            } else {
                // Only a near-tie may flip: two logits (or, with sigmoid
                // scores, two scores) within the 2^-12 quantization of each other.
                let mut l: heapless::Vec<f32, 8> = logits.clone();
                l.sort_by(|a, b| b.total_cmp(a));
                let closest = l.windows(2).map(|w| w[0] - w[1]).fold(f32::INFINITY, f32::min);
                assert!(closest <= 2.0 / 4096.0, "{rule:?} {logits:?}: {f:?} vs {i:?}");
                near_ties += 1;
            }
        }
        assert!(same >= 190, "{rule:?}: only {same} of 200 identical ({near_ties} near ties)");
    }
}
