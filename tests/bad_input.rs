//! Bad input gets a specific error, never a panic: short or misaligned
//! scratch, wrong lengths, NaN, too-small statistics, inconsistent layers.

use micromoe::build::QMoeBuf;
use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::error::{Error, What};
use micromoe::expert::Expert;
use micromoe::kernels::{Activation, Linear};
use micromoe::{MoeLayer, Router, Rule, Stats};

fn model() -> MoeBuf<f32> {
    let mut seed = 7u32;
    let mut v = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    };
    let experts = (0..4)
        .map(|_| {
            let (w1, w3, w2) = (v(24), v(24), v(24));
            ExpertBuf::gated(
                LinearBuf::new(w1, None, 6, 4),
                LinearBuf::new(w3, None, 6, 4),
                LinearBuf::new(w2, None, 4, 6),
                Activation::Silu,
            )
        })
        .collect();
    let mut m = MoeBuf::new(LinearBuf::new(v(16), None, 4, 4), experts, Rule::qwen2_moe(4, 2, false));
    let shared = ExpertBuf::mlp(
        LinearBuf::new(v(12), Some(v(3)), 3, 4),
        LinearBuf::new(v(12), Some(v(4)), 4, 3),
        Activation::Gelu,
    );
    m.shared = Some((shared, Some(LinearBuf::new(v(4), None, 1, 4))));
    m
}

const X: [f32; 4] = [0.3, -1.0, 0.5, 2.0];

#[test]
fn float_layer_scratch_short_or_misaligned() {
    let m = model();
    let views = m.expert_views().unwrap();
    let layer = m.layer(&views).unwrap();
    let need = layer.scratch_bytes();
    let mut want = [0.0f32; 4];
    layer.infer(&X, &mut want, &mut vec![0u8; need]).unwrap();
    let mut buf = vec![0u8; need + 16];
    // scratch_bytes() includes room to align each piece, so a lucky buffer
    // may do with a little less: every length either works or says so.
    for len in 0..need {
        let mut y = [0.0f32; 4];
        match layer.infer(&X, &mut y, &mut buf[..len]) {
            Err(Error::ScratchTooSmall { actual, needed }) => {
                assert!(actual == len && needed > len)
            }
            Ok(_) => assert!(y == want && len + 16 > need, "{len}"),
            other => panic!("{len}: {other:?}"),
        }
    }
    for offset in 0..8 {
        let mut y = [0.0f32; 4];
        layer.infer(&X, &mut y, &mut buf[offset..offset + need]).unwrap();
        assert_eq!(y, want, "offset {offset}");
    }
}

#[test]
fn integer_layers_scratch_short_or_misaligned() {
    let m = model();
    let views = m.expert_views().unwrap();
    let float = m.layer(&views).unwrap();
    let q = QMoeBuf::<i16>::quantize(&float, &X).unwrap();
    let qviews = q.expert_views().unwrap();
    let layer = q.layer(&qviews).unwrap();
    let need = layer.scratch_bytes();
    let mut x = [0i16; 4];
    q.input.quantize_slice(&X, &mut x).unwrap();
    let mut want = [0i16; 4];
    layer.infer(&x, &mut want, &mut vec![0u8; need]).unwrap();
    let mut buf = vec![0u8; need + 16];
    for len in 0..need {
        let mut y = [0i16; 4];
        match layer.infer(&x, &mut y, &mut buf[..len]) {
            Err(Error::ScratchTooSmall { actual, needed }) => {
                assert!(actual == len && needed > len)
            }
            Ok(_) => assert!(y == want && len + 16 > need, "{len}"),
            other => panic!("{len}: {other:?}"),
        }
    }
    for offset in 0..8 {
        let mut y = [0i16; 4];
        layer.infer(&x, &mut y, &mut buf[offset..offset + need]).unwrap();
        assert_eq!(y, want, "offset {offset}");
    }
}

#[test]
fn wrong_lengths_nan_and_small_stats_are_errors() {
    let m = model();
    let views = m.expert_views().unwrap();
    let layer = m.layer(&views).unwrap();
    let mut s = vec![0u8; layer.scratch_bytes()];
    let mut y = [0.0f32; 4];
    assert_eq!(
        layer.infer(&X[..3], &mut y, &mut s).unwrap_err(),
        Error::Shape { what: What::Input, expected: 4, actual: 3 }
    );
    assert_eq!(
        layer.infer(&X, &mut y[..2], &mut s).unwrap_err(),
        Error::Shape { what: What::Output, expected: 4, actual: 2 }
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let x = [0.0, 0.0, bad, 0.0];
        assert_eq!(
            layer.infer(&x, &mut y, &mut s).unwrap_err(),
            Error::NonFinite { what: What::Input, index: 2 }
        );
    }
    assert_eq!(
        layer.infer_with_stats(&X, &mut y, &mut s, &mut Stats::<3>::new()).unwrap_err(),
        Error::StatsTooSmall { experts: 4, capacity: 3 }
    );
    // Calibration data must be whole, finite tokens.
    assert!(QMoeBuf::<i8>::quantize(&layer, &X[..3]).is_err());
    assert!(QMoeBuf::<i8>::quantize(&layer, &[]).is_err());
    assert!(QMoeBuf::<i8>::quantize(&layer, &[f32::NAN, 0.0, 0.0, 0.0]).is_err());
}

#[test]
fn inconsistent_layers_are_refused() {
    let w = [0.5f32; 24];
    let lin = |r, c| Linear::new(&w[..r * c], None, r, c).unwrap();
    let e4 = Expert::mlp(lin(6, 4), lin(4, 6), Activation::Relu).unwrap();
    let e3 = Expert::mlp(lin(6, 3), lin(4, 6), Activation::Relu).unwrap();
    let router = Router::new(Rule::mixtral(2, 1), None, 1.0).unwrap();
    // An expert with another input width.
    let experts = [e4, e3];
    assert_eq!(
        MoeLayer::new(lin(2, 4), router, &experts, None).unwrap_err(),
        Error::DimMismatch { what: What::Input, expected: 4, actual: 3 }
    );
    // The gate must have one row per expert, and the rule one expert per view.
    let experts = [e4, e4];
    assert!(MoeLayer::new(lin(3, 4), router, &experts, None).is_err());
    assert!(MoeLayer::new(lin(2, 4), router, &experts[..1], None).is_err());
    // Expert parts that do not chain.
    assert!(Expert::mlp(lin(6, 4), lin(4, 5), Activation::Relu).is_err());
    assert!(Expert::gated(lin(6, 4), lin(5, 4), lin(4, 6), Activation::Silu).is_err());
}

/// Experts that can be had while the layer is built, and not afterwards:
/// e.g. external storage that fails. The layer used to skip such an expert
/// (`continue`) and return the others' sum, a wrong answer; now the
/// inference fails with the source's error, on one token and in a batch.
#[test]
fn an_expert_that_cannot_be_had_is_an_error_not_skipped() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static UP: [f32; 8] = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0];
    static DOWN: [f32; 8] = [1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, -1.0];
    static GATE: [f32; 4] = [1.0, 0.0, 0.0, 1.0];
    struct Flaky<'a> {
        expert: Expert<'a, f32>,
        broken: AtomicBool,
    }
    impl<'a> micromoe::moe::ExpertSource for &Flaky<'a> {
        type Expert = Expert<'a, f32>;
        fn count(&self) -> usize {
            2
        }
        fn expert(&self, i: usize) -> micromoe::Result<Expert<'a, f32>> {
            if i == 1 && self.broken.load(Ordering::Relaxed) {
                Err(Error::OutOfRange { what: What::Experts, index: i })
            } else {
                Ok(self.expert)
            }
        }
    }
    let up = Linear::new(&UP, None, 4, 2).unwrap();
    let expert = Expert::mlp(up, Linear::new(&DOWN, None, 2, 4).unwrap(), Activation::Relu).unwrap();
    let flaky = Flaky { expert, broken: AtomicBool::new(false) };
    let router = Router::new(Rule::mixtral(2, 2), None, 1.0).unwrap();
    let layer = MoeLayer::new(Linear::new(&GATE, None, 2, 2).unwrap(), router, &flaky, None).unwrap();
    flaky.broken.store(true, Ordering::Relaxed);
    let mut scratch = vec![0u8; layer.scratch_bytes()];
    let mut y = [0.0f32; 2];
    let err = layer.infer(&[1.0, 0.5], &mut y, &mut scratch).unwrap_err();
    assert_eq!(err, Error::OutOfRange { what: What::Experts, index: 1 });
    #[cfg(feature = "std")]
    {
        let mut out = [0.0f32; 4];
        let err = layer.infer_batch(&[1.0, 0.5, 0.5, 1.0], &mut out, 1).unwrap_err();
        assert_eq!(err, Error::OutOfRange { what: What::Experts, index: 1 });
    }
}
