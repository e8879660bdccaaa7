//! The batched CPU path gives the single-token path's numbers, bit for bit,
//! whatever the number of threads, and the dispatch plan groups every
//! (token, choice) once.

mod common;

use common::{Fixture, MOE_CASES, to_f16, to_f32, with_layer};
use micromoe::kernels::FloatWeight;
use micromoe::router::DispatchPlan;

fn check<W: FloatWeight + Sync>(name: &str, conv: fn(f32) -> W) {
    let fx = Fixture::load(name);
    with_layer(&fx, conv, |layer| {
        let xs = fx.f32("x");
        let n = fx.tokens();
        let mut want = vec![0.0f32; n * layer.out_dim()];
        let mut scratch = vec![0u8; layer.scratch_bytes()];
        let mut chosen = Vec::new();
        for (x, y) in xs.chunks_exact(layer.in_dim()).zip(want.chunks_exact_mut(layer.out_dim())) {
            chosen.push(layer.infer(x, y, &mut scratch).unwrap());
        }
        for threads in [1, 3, 16] {
            let mut got = vec![0.0f32; want.len()];
            let sel = layer.infer_batch(xs, &mut got, threads).unwrap();
            assert_eq!(sel, chosen, "{name}: choices with {threads} threads");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{name}: outputs with {threads} threads");
        }
        // The plan holds every choice once, grouped by expert, tokens ascending.
        let plan = DispatchPlan::new(&chosen, layer.router().rule().experts).unwrap();
        assert_eq!(plan.tokens.len(), n * fx.meta("k"));
        for e in 0..plan.experts() {
            let g = plan.group(e);
            assert!(g.tokens.windows(2).all(|w| w[0] < w[1]));
            for (&t, &slot) in g.tokens.iter().zip(g.slots) {
                assert_eq!(chosen[t as usize][slot as usize].expert as usize, e);
            }
        }
    });
}

#[test]
fn batched_f32_equals_token_by_token() {
    for name in MOE_CASES {
        check(name, to_f32);
    }
}

#[test]
fn batched_f16_equals_token_by_token() {
    for name in MOE_CASES {
        check(name, to_f16);
    }
}

#[test]
fn bad_batches_are_refused() {
    let fx = Fixture::load("mixtral_h16_e4_k1");
    with_layer(&fx, to_f32, |layer| {
        let mut out = vec![0.0; 2 * layer.out_dim()];
        assert!(layer.infer_batch(&fx.f32("x")[..layer.in_dim() * 2 - 1], &mut out, 2).is_err());
        assert!(layer.infer_batch(&fx.f32("x")[..layer.in_dim() * 2], &mut out[1..], 2).is_err());
        assert!(layer.infer_batch(&[], &mut [], 2).is_err());
        let mut nan = fx.f32("x")[..layer.in_dim() * 2].to_vec();
        nan[5] = f32::NAN;
        assert!(layer.infer_batch(&nan, &mut out, 0).is_err());
    });
    let mut bad = micromoe::Selection::<f32>::new();
    bad.push(micromoe::Choice { expert: 9, weight: 1.0 }).unwrap();
    assert!(DispatchPlan::new(&[bad], 4).is_err());
}

fn check_int<A: micromoe::kernels::IntKernel + Send + Sync>(name: &str)
where
    A::Bias: Sync,
{
    let fx = Fixture::load(name);
    with_layer(&fx, to_f32, |float| {
        let q = micromoe::build::QMoeBuf::<A>::quantize(float, fx.f32("x")).unwrap();
        let views = q.expert_views().unwrap();
        let layer = q.layer(&views).unwrap();
        let mut xs = vec![A::default(); fx.f32("x").len()];
        q.input.quantize_slice(fx.f32("x"), &mut xs).unwrap();
        let n = fx.tokens();
        let mut want = vec![A::default(); n * layer.out_dim()];
        let mut scratch = vec![0u8; layer.scratch_bytes()];
        let mut chosen = Vec::new();
        for (x, y) in xs.chunks_exact(layer.in_dim()).zip(want.chunks_exact_mut(layer.out_dim())) {
            chosen.push(layer.infer(x, y, &mut scratch).unwrap());
        }
        for threads in [1, 3] {
            let mut got = vec![A::default(); want.len()];
            let sel = layer.infer_batch(&xs, &mut got, threads).unwrap();
            assert_eq!(sel, chosen, "{name}: choices with {threads} threads");
            assert_eq!(got, want, "{name}: outputs with {threads} threads");
        }
    });
}

#[test]
fn batched_integer_layers_equal_token_by_token() {
    for name in MOE_CASES {
        check_int::<i8>(name);
        check_int::<i16>(name);
    }
}
