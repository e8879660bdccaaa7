//! int8 and Q15 layers against the PyTorch blocks, within an error bound
//! derived from the quantization steps and checked element by element.
//!
//! The bound follows every rounding through the layer, in f64, from the
//! fixture's float weights and inputs (true values `x`, their error bound `e`):
//!
//! - quantized input: `e = s_x / 2`;
//! - linear `y = W x` with int8 weights `Wq = W + dW` (`|dW| <= s_w[o] / 2`):
//!   `e_y[o] = sum_i |Wq[o,i]| e[i] + s_w[o] / 2 * sum_i |x[i]| + s_y / 2 + d_M (|y[o]| + ...)`,
//!   where `d_M` is the multiplier's relative error (`2^-30` for the 32-bit
//!   multiplier of int8, `2^-15` for the reduced one of the 16x8 scheme and of
//!   router logits);
//! - bias, rounded to accumulator units: `+ s_x s_w[o] / 2`;
//! - ReLU is exact on quantized values: `e_a = e_g`;
//! - table activation `f` (SiLU: slope <= 1.1, |f''| <= 0.5; GELU: slope
//!   <= 1.13, |f''| <= 0.8): `e_a = slope e_g + s_a / 2`; the interpolated
//!   Q15 table adds a second rounding `s_a / 2` and `|f''| h^2 / 8` with knot
//!   spacing `h = 128 s_g`;
//! - product: `e_h = |a| e_u + |u| e_a + e_a e_u + s_h / 2`;
//! - router weights (softmax): `sum_j |dw_i / dl_j| <= 1/2`, so
//!   `e_w = 0.55 max e_l + 2^-15` (Q15 rounding); the shared gate's sigmoid
//!   has slope <= 1/4;
//! - combine: `e_out = sum_i (|w_i| e_y_i + |y_i| e_w + e_w e_y_i) + s_out / 2 + 2^-15 |out|`.
//!
//! A token whose k-th and (k+1)-th float logits are closer than twice the
//! logit error bound may legitimately pick another expert; such tokens are
//! counted and skipped, every other token must pick exactly PyTorch's experts.

mod common;

use common::{Fixture, MOE_CASES, to_f32, with_layer};
use micromoe::build::QLinearBuf;
use micromoe::build::{QExpertBuf, QMoeBuf};
use micromoe::kernels::{Activation, IntKernel};
use micromoe::quant::QuantParams;

/// A non-linearity for the bound: the function, its largest slope and its
/// largest |second derivative|.
struct Act {
    f: fn(f64) -> f64,
    slope: f64,
    curvature: f64,
    relu: bool,
}

fn act_of(fx: &Fixture) -> Act {
    match fx.activation() {
        Activation::Silu => Act { f: |x| x / (1.0 + (-x).exp()), slope: 1.1, curvature: 0.5, relu: false },
        // GELU: slope <= 1.13, |f''| = phi(x) (2 - x^2) <= 2 phi(0) < 0.8.
        Activation::Gelu => {
            Act { f: |x| 0.5 * x * (1.0 + erf(x / 2f64.sqrt())), slope: 1.13, curvature: 0.8, relu: false }
        }
        Activation::Relu => Act { f: |x| x.max(0.0), slope: 1.0, curvature: 0.0, relu: true },
        a => panic!("no bound for {a:?}"),
    }
}

/// erf to 1.2e-7 (Numerical Recipes' erfc approximation).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let p = -x * x - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let r = 1.0 - t * p.exp();
    if x >= 0.0 { r } else { -r }
}

fn is_q15<A: IntKernel>() -> bool {
    A::LUT_LEN != 256
}

/// True output and error bound of a quantized linear layer.
fn linear<A: IntKernel>(
    q: &QLinearBuf<A>,
    w: &[f32],
    b: Option<&[f32]>,
    x: &[f64],
    e: &[f64],
    d_m: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; q.rows];
    let mut err = vec![0.0; q.rows];
    for o in 0..q.rows {
        let s_w = q.weight_scales[o] as f64;
        let (mut yo, mut eo, mut xabs) = (0.0, 0.0, 0.0);
        for i in 0..q.cols {
            yo += w[o * q.cols + i] as f64 * x[i];
            eo += (q.weights[o * q.cols + i] as f64 * s_w).abs() * e[i];
            xabs += x[i].abs();
        }
        if let Some(b) = b {
            // The bias is rounded to accumulator units s_in * s_w.
            yo += b[o] as f64;
            eo += q.input.scale as f64 * s_w / 2.0;
        }
        eo += s_w / 2.0 * xabs + q.output.scale as f64 / 2.0;
        eo += d_m * (yo.abs() + eo);
        y[o] = yo;
        err[o] = eo;
    }
    (y, err)
}

/// The activation on the integer path: exact for ReLU, a table otherwise.
fn activation<A: IntKernel>(
    act: &Act,
    g: &[f64],
    e_g: &[f64],
    input: QuantParams,
    out: QuantParams,
) -> (Vec<f64>, Vec<f64>) {
    let a = g.iter().map(|&v| (act.f)(v)).collect();
    if act.relu {
        return (a, e_g.to_vec());
    }
    let s_a = out.scale as f64;
    let extra = if is_q15::<A>() {
        let h = 128.0 * input.scale as f64;
        s_a / 2.0 + act.curvature * h * h / 8.0
    } else {
        0.0
    };
    let e = e_g.iter().map(|&v| act.slope * v + s_a / 2.0 + extra).collect();
    (a, e)
}

/// True output and error bound of one quantized expert.
fn expert<A: IntKernel>(
    q: &QExpertBuf<A>,
    fx: &Fixture,
    prefix: &str,
    x: &[f64],
    e: &[f64],
    d_m: f64,
) -> (Vec<f64>, Vec<f64>) {
    let t = |k: &str| fx.f32(&format!("{prefix}.{k}"));
    let act = act_of(fx);
    let Some((gq, _)) = q.gate.as_ref() else {
        let (u, e_u) = linear(&q.up, t("up"), Some(t("up_bias")), x, e, d_m);
        let (a, e_a) = activation::<A>(&act, &u, &e_u, q.up.output, q.act_out);
        return linear(&q.down, t("down"), Some(t("down_bias")), &a, &e_a, d_m);
    };
    let (g, e_g) = linear(gq, t("w1"), None, x, e, d_m);
    let (u, e_u) = linear(&q.up, t("w3"), None, x, e, d_m);
    let (a, e_a) = activation::<A>(&act, &g, &e_g, gq.output, q.act_out);
    let s_h = q.down.input.scale as f64;
    let h: Vec<f64> = a.iter().zip(&u).map(|(a, u)| a * u).collect();
    let e_h: Vec<f64> = (0..h.len())
        .map(|i| a[i].abs() * e_u[i] + u[i].abs() * e_a[i] + e_a[i] * e_u[i] + s_h / 2.0 + 1e-9 * h[i].abs())
        .collect();
    linear(&q.down, t("w2"), None, &h, &e_h, d_m)
}

struct Report {
    tokens: usize,
    near_ties: usize,
    worst_rel: f64,
    worst_lsb: f64,
    worst_ratio: f64,
}

fn check<A: IntKernel>(name: &str) -> Report {
    let fx = Fixture::load(name);
    let k = fx.meta("k");
    with_layer(&fx, to_f32, |float| {
        let q = QMoeBuf::<A>::quantize(float, fx.f32("x")).unwrap();
        let views = q.expert_views().unwrap();
        let layer = q.layer(&views).unwrap();
        let mut scratch = vec![0u8; layer.scratch_bytes()];
        let (mut xq, mut yq) = (vec![A::default(); layer.in_dim()], vec![A::default(); layer.out_dim()]);
        let d_m = if is_q15::<A>() { 2f64.powi(-15) } else { 2f64.powi(-30) };
        let mut r = Report { tokens: 0, near_ties: 0, worst_rel: 0.0, worst_lsb: 0.0, worst_ratio: 0.0 };
        for t in 0..fx.tokens() {
            let x32 = fx.row("x", t);
            q.input.quantize_slice(x32, &mut xq).unwrap();
            let sel = layer.infer(&xq, &mut yq, &mut scratch).unwrap();

            let x: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
            let e_x = vec![q.input.scale as f64 / 2.0; x.len()];
            let (l, e_l) = linear(&q.gate, fx.f32("gate"), None, &x, &e_x, 2f64.powi(-15));
            let e_lmax = e_l.iter().cloned().fold(0.0, f64::max);
            // The gate is the first layer, so its error is known exactly up to
            // the final rounding: int8 weights times the quantized input.
            let xq_real: Vec<f64> = xq.iter().map(|&v| q.input.dequantize(v) as f64).collect();
            let e_l_exact = (0..l.len())
                .map(|o| {
                    let (s_w, n) = (q.gate.weight_scales[o] as f64, q.gate.cols);
                    let lq: f64 = (0..n).map(|i| q.gate.weights[o * n + i] as f64 * s_w * xq_real[i]).sum();
                    (lq - l[o]).abs() + 2f64.powi(-13) + 2f64.powi(-15) * lq.abs()
                })
                .fold(0.0, f64::max);
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let margin = if k < sorted.len() { sorted[k - 1] - sorted[k] } else { f64::INFINITY };

            let mut want: Vec<u16> = fx.experts_row("experts", t);
            let mut got: Vec<u16> = sel.iter().map(|c| c.expert).collect();
            want.sort();
            got.sort();
            if margin <= 2.0 * e_l_exact {
                r.near_ties += 1;
                continue;
            }
            assert_eq!(
                got, want,
                "{name} token {t}: experts (margin {margin:.4}, logit error <= {e_l_exact:.4})"
            );

            // Combine: sum_i w_i y_i (+ g y_shared).
            let e_w = 0.55 * e_lmax + 2f64.powi(-15);
            let out_dim = layer.out_dim();
            let (mut out, mut e_out) = (vec![0.0; out_dim], vec![0.0; out_dim]);
            let mut add = |w: f64, e_w: f64, y: &[f64], e_y: &[f64]| {
                for j in 0..out_dim {
                    out[j] += w * y[j];
                    e_out[j] += w.abs() * e_y[j] + y[j].abs() * e_w + e_w * e_y[j];
                }
            };
            let ids = fx.experts_row("experts", t);
            for (i, &e) in ids.iter().enumerate() {
                let w = fx.row("weights", t)[i] as f64;
                let (y, e_y) = expert(&q.experts[e as usize], &fx, &format!("experts.{e}"), &x, &e_x, d_m);
                add(w, e_w, &y, &e_y);
            }
            if let Some((sq, Some(sg))) = &q.shared {
                let (gl, e_gl) = linear(sg, fx.f32("shared_gate"), None, &x, &e_x, 2f64.powi(-15));
                let g = 1.0 / (1.0 + (-gl[0]).exp());
                let (y, e_y) = expert(sq, &fx, "shared", &x, &e_x, d_m);
                add(g, 0.25 * e_gl[0] + 2f64.powi(-15), &y, &e_y);
            }
            let reference = fx.row("y", t);
            let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            for j in 0..out_dim {
                let bound =
                    e_out[j] + q.output.scale as f64 / 2.0 + 2f64.powi(-15) * out[j].abs() + 1e-5 * scale;
                let err = (q.output.dequantize(yq[j]) as f64 - reference[j] as f64).abs();
                assert!(err <= bound, "{name} token {t} out {j}: error {err:.5} > bound {bound:.5}");
                r.worst_ratio = r.worst_ratio.max(err / bound);
                r.worst_rel = r.worst_rel.max(err / scale);
                r.worst_lsb = r.worst_lsb.max(err / q.output.scale as f64);
            }
            r.tokens += 1;
        }
        r
    })
}

fn run_all<A: IntKernel>(label: &str) {
    let (mut tokens, mut ties, mut rel, mut lsb, mut ratio) = (0, 0, 0.0f64, 0.0f64, 0.0f64);
    for name in MOE_CASES {
        let r = check::<A>(name);
        println!(
            "{label} {name}: {} tokens, {} near ties, max error: {:.2e} of the row's max, {:.1} output steps, {:.2} of the bound",
            r.tokens, r.near_ties, r.worst_rel, r.worst_lsb, r.worst_ratio
        );
        tokens += r.tokens;
        ties += r.near_ties;
        rel = rel.max(r.worst_rel);
        lsb = lsb.max(r.worst_lsb);
        ratio = ratio.max(r.worst_ratio);
    }
    println!(
        "{label}: {tokens} tokens checked, {ties} near ties skipped; worst error {rel:.2e} of the row's max, {lsb:.1} output steps, {ratio:.2} of the bound"
    );
    assert!(ties * 10 <= tokens, "too many near ties: {ties} of {tokens}");
}

#[test]
fn int8_layers_within_derived_bound() {
    run_all::<i8>("int8");
}

#[test]
fn q15_layers_within_derived_bound() {
    run_all::<i16>("q15");
}
