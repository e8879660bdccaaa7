//! Post-training quantization of a float layer to int8 or Q15 (`alloc`).
//!
//! Weights: symmetric int8 per output channel. Activations: ranges observed
//! while running the float layer over calibration tokens, each expert on the
//! tokens the router sends it (an expert chosen for none sees them all);
//! asymmetric int8 or symmetric Q15. A table activation's output range is the function over
//! the table's whole input range, so the table never saturates. All expert outputs share one quantization (the
//! combine needs a common scale). Router logits use the fixed
//! `2^-LOGIT_FRAC_BITS` scale; the selection bias and scaling factor become Q15.

use alloc::vec;
use alloc::vec::Vec;

use super::owned::LinearBuf;
use crate::build::{QLinearBuf, act_params, mul_params};
use crate::error::{Error, Result, What};
use crate::expert::{Expert, Ffn, QActivation, QExpert};
use crate::kernels::{Activation, FloatWeight, IntKernel, Linear, MulParams};
use crate::moe::{Combine, ExpertSource, FloatGate, MoeLayer, QMoeLayer, QSharedExpert};
use crate::quant::{Multiplier, QuantParams, build_lut, f16};
use crate::router::{IntRouter, LOGIT_FRAC_BITS, ONE_Q15, Router, Rule};

/// Smallest and largest value seen.
#[derive(Debug, Clone, Copy)]
struct Range {
    min: f32,
    max: f32,
}

impl Range {
    const EMPTY: Range = Range { min: 0.0, max: 0.0 };

    fn see(&mut self, xs: &[f32]) {
        for &x in xs {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
    }

    fn params<A: IntKernel>(&self) -> Result<QuantParams> {
        act_params::<A>(self.min, self.max)
    }
}

fn weights<W: FloatWeight>(l: &Linear<'_, W>) -> Vec<f32> {
    l.weights().iter().map(|w| w.to_f32()).collect()
}

fn quantize_linear<A: IntKernel, W: FloatWeight>(
    l: &Linear<'_, W>,
    input: QuantParams,
    output: QuantParams,
) -> Result<QLinearBuf<A>> {
    QLinearBuf::quantize(&weights(l), l.bias(), l.rows(), l.cols(), input, output)
}

/// An integer expert that owns its data.
#[derive(Debug, Clone)]
pub struct QExpertBuf<A: IntKernel> {
    /// `up` (or Mixtral `w3`).
    pub up: QLinearBuf<A>,
    /// Gated units: `gate` (`w1`) and the product's parameters.
    pub gate: Option<(QLinearBuf<A>, MulParams)>,
    /// The activation table; `None` for ReLU.
    pub lut: Option<Vec<A>>,
    /// Quantization of the activation's output.
    pub act_out: QuantParams,
    /// The function the table encodes (ReLU: no table).
    pub act: Activation,
    /// `down` (`w2`).
    pub down: QLinearBuf<A>,
}

impl<A: IntKernel> QExpertBuf<A> {
    /// The borrowed expert, validated.
    pub fn view(&self) -> Result<QExpert<'_, A>> {
        let act = match &self.lut {
            Some(t) => QActivation::Lut(t),
            None => QActivation::Relu,
        };
        match &self.gate {
            None => QExpert::mlp(self.up.view()?, act, self.down.view()?),
            Some((g, m)) => QExpert::gated(g.view()?, self.up.view()?, act, *m, self.down.view()?),
        }
    }
}

/// Activation ranges of one expert over the calibration tokens.
struct ExpertRanges {
    up: Range,
    gate: Range,
    hidden: Range,
    out: Range,
}

fn observe<W: FloatWeight>(e: &Expert<'_, W>, tokens: &[f32]) -> ExpertRanges {
    let f = e.ffn();
    let (mut u, mut g, mut y) =
        (vec![0.0; f.hidden_dim()], vec![0.0; f.hidden_dim()], vec![0.0; f.out_dim()]);
    let mut r =
        ExpertRanges { up: Range::EMPTY, gate: Range::EMPTY, hidden: Range::EMPTY, out: Range::EMPTY };
    for x in tokens.chunks_exact(f.in_dim()) {
        match f {
            Ffn::Mlp { up, act, down } => {
                up.forward(x, &mut u);
                r.up.see(&u);
                act.apply(&mut u);
                down.forward(&u, &mut y);
            }
            Ffn::Gated { gate, up, act, down } => {
                gate.forward(x, &mut g);
                r.gate.see(&g);
                up.forward(x, &mut u);
                r.up.see(&u);
                act.apply(&mut g);
                g.iter_mut().zip(&u).for_each(|(a, b)| *a *= b);
                r.hidden.see(&g);
                down.forward(&g, &mut y);
            }
        }
        r.out.see(&y);
    }
    r
}

/// Range of `act` over every input its table can be asked about, so the
/// table never saturates (not just the values seen in calibration).
fn act_range<A: IntKernel>(act: Activation, input: QuantParams) -> Range {
    let step = if A::LUT_LEN == 256 { 1 } else { 128 };
    let mut r = Range::EMPTY;
    for j in 0..A::LUT_LEN as i32 {
        let q = A::MIN + j * step;
        r.see(&[act.eval(input.scale * (q - input.zero_point) as f32)]);
    }
    r
}

fn lut<A: IntKernel>(act: Activation, input: QuantParams, output: QuantParams) -> Result<Option<Vec<A>>> {
    if act == Activation::Relu {
        return Ok(None);
    }
    let mut t = vec![A::default(); A::LUT_LEN];
    build_lut(|x| act.eval(x), input, output, &mut t)?;
    Ok(Some(t))
}

fn quantize_expert<A: IntKernel, W: FloatWeight>(
    e: &Expert<'_, W>,
    r: &ExpertRanges,
    input: QuantParams,
    out: QuantParams,
) -> Result<QExpertBuf<A>> {
    match e.ffn() {
        Ffn::Mlp { up, act, down } => {
            let u = r.up.params::<A>()?;
            let a = if *act == Activation::Relu { u } else { act_range::<A>(*act, u).params::<A>()? };
            Ok(QExpertBuf {
                up: quantize_linear(up, input, u)?,
                gate: None,
                lut: lut(*act, u, a)?,
                act_out: a,
                act: *act,
                down: quantize_linear(down, a, out)?,
            })
        }
        Ffn::Gated { gate, up, act, down } => {
            let (g, u) = (r.gate.params::<A>()?, r.up.params::<A>()?);
            let a = if *act == Activation::Relu { g } else { act_range::<A>(*act, g).params::<A>()? };
            let h = r.hidden.params::<A>()?;
            Ok(QExpertBuf {
                up: quantize_linear(up, input, u)?,
                gate: Some((quantize_linear(gate, input, g)?, mul_params(a, u, h)?)),
                lut: lut(*act, g, a)?,
                act_out: a,
                act: *act,
                down: quantize_linear(down, h, out)?,
            })
        }
    }
}

/// A quantized MoE layer that owns its data. Use it in two steps, because the
/// layer borrows a slice of expert views:
///
/// ```
/// use micromoe::kernels::Activation;
/// use micromoe::build::QMoeBuf;
/// use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
/// use micromoe::Rule;
/// let lin = |v: f32, rows, cols| LinearBuf::new(vec![v; rows * cols], None, rows, cols);
/// let experts = vec![
///     ExpertBuf::mlp(lin(0.5, 4, 2), lin(0.25, 2, 4), Activation::Relu),
///     ExpertBuf::mlp(lin(-0.5, 4, 2), lin(0.25, 2, 4), Activation::Relu),
/// ];
/// let gate = LinearBuf::new(vec![1.0, 1.0, -1.0, -1.0], None, 2, 2);
/// let model = MoeBuf::new(gate, experts, Rule::switch(2));
/// let views = model.expert_views().unwrap();
/// let float = model.layer(&views).unwrap();
///
/// let calibration = [1.0f32, 2.0, -1.0, -0.5, 0.0, 0.3];
/// let q = QMoeBuf::<i8>::quantize(&float, &calibration).unwrap();
/// let experts = q.expert_views().unwrap();
/// let layer = q.layer(&experts).unwrap();
/// let mut scratch = vec![0u8; layer.scratch_bytes()];
/// let (mut x, mut y) = ([0i8; 2], [0i8; 2]);
/// q.input.quantize_slice(&[1.0, 2.0], &mut x).unwrap();
/// let sel = layer.infer(&x, &mut y, &mut scratch).unwrap();
/// assert_eq!(sel[0].expert, 0);
/// ```
#[derive(Debug, Clone)]
pub struct QMoeBuf<A: IntKernel> {
    /// Quantization of the layer's input.
    pub input: QuantParams,
    /// Quantization of the layer's output.
    pub output: QuantParams,
    /// Common quantization of every expert's output.
    pub expert_out: QuantParams,
    /// Gate emitting fixed-point logits.
    pub gate: QLinearBuf<A>,
    /// Routed experts.
    pub experts: Vec<QExpertBuf<A>>,
    /// Shared expert and its gate.
    pub shared: Option<(QExpertBuf<A>, Option<QLinearBuf<A>>)>,
    /// Routing rule.
    pub rule: Rule,
    /// Selection bias in Q15.
    pub bias_q15: Option<Vec<i32>>,
    /// Routed scaling factor in Q15.
    pub scaling_q15: i32,
    /// How outputs are summed.
    pub combine: Combine,
    /// A float gate that replaces the integer one (see
    /// [`QMoeBuf::with_float_gate`]).
    pub float_gate: Option<FloatGateBuf>,
}

/// The float gate of a mixed layer: weights, selection bias, scaling factor.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatGateBuf {
    /// `(experts, in)` weights, kept in f32 or rounded to f16.
    pub weights: FloatWeights,
    /// Selection bias.
    pub bias: Option<Vec<f32>>,
    /// Routed scaling factor.
    pub scaling: f32,
}

/// Gate weights in f32 or f16.
#[derive(Debug, Clone, PartialEq)]
pub enum FloatWeights {
    /// f32.
    F32(LinearBuf<f32>),
    /// f16.
    F16(LinearBuf<f16>),
}

impl<A: IntKernel> QMoeBuf<A> {
    /// Routes with `layer`'s float gate and router (f32, or f16 if `half`)
    /// over the dequantized input instead of the integer gate: int8 experts
    /// behind a float router, which does not flip near-ties the way an
    /// 8-bit gate can.
    pub fn with_float_gate<'a, G: FloatWeight, W: FloatWeight, S: ExpertSource<Expert = Expert<'a, W>>>(
        mut self,
        layer: &MoeLayer<'a, G, W, S>,
        half: bool,
    ) -> Self {
        let g = layer.gate();
        let w: Vec<f32> = g.weights().iter().map(|v| v.to_f32()).collect();
        let (rows, cols) = (g.rows(), g.cols());
        let weights = if half {
            FloatWeights::F16(LinearBuf::new(w.iter().map(|&v| f16::from_f32(v)).collect(), None, rows, cols))
        } else {
            FloatWeights::F32(LinearBuf::new(w, None, rows, cols))
        };
        let router = layer.router();
        self.float_gate = Some(FloatGateBuf {
            weights,
            bias: router.bias().map(<[f32]>::to_vec),
            scaling: router.scaling(),
        });
        self
    }

    /// Quantizes `layer` (any expert source), calibrating activations on `calibration`
    /// (`(tokens, in)` row-major, at least one token, finite).
    pub fn quantize<'a, G: FloatWeight, W: FloatWeight, S: ExpertSource<Expert = Expert<'a, W>>>(
        layer: &MoeLayer<'a, G, W, S>,
        calibration: &[f32],
    ) -> Result<Self> {
        Self::quantize_inner(layer, calibration, None)
    }

    /// Quantizes `layer`'s gate, router and combine, reusing the quantized
    /// experts (and their input and output quantization) of `base`: for
    /// gates that route over one expert pool (multi-gate MoE). `layer`'s
    /// experts must be the ones `base` was made from.
    pub fn quantize_sharing<'a, G: FloatWeight, W: FloatWeight, S: ExpertSource<Expert = Expert<'a, W>>>(
        layer: &MoeLayer<'a, G, W, S>,
        calibration: &[f32],
        base: &QMoeBuf<A>,
    ) -> Result<Self> {
        Self::quantize_inner(layer, calibration, Some(base))
    }

    fn quantize_inner<'a, G: FloatWeight, W: FloatWeight, S: ExpertSource<Expert = Expert<'a, W>>>(
        layer: &MoeLayer<'a, G, W, S>,
        calibration: &[f32],
        base: Option<&QMoeBuf<A>>,
    ) -> Result<Self> {
        let (d_in, d_out) = (layer.in_dim(), layer.out_dim());
        if calibration.is_empty() || !calibration.len().is_multiple_of(d_in) {
            return Err(Error::Shape { what: What::Calibration, expected: d_in, actual: calibration.len() });
        }
        crate::error::check_finite(What::Calibration, calibration)?;
        let mut input = Range::EMPTY;
        input.see(calibration);
        let input = match base {
            Some(b) => b.input,
            None => input.params::<A>()?,
        };

        let n_experts = layer.router().rule().experts;
        let mut output = Range::EMPTY;
        let mut y = vec![0.0; d_out];
        let mut scratch = vec![0u8; layer.scratch_bytes()];
        // Tokens each expert is chosen for: it is calibrated on those.
        let mut tokens_of: Vec<Vec<f32>> = vec![Vec::new(); n_experts];
        for x in calibration.chunks_exact(d_in) {
            let sel = layer.infer(x, &mut y, &mut scratch)?;
            output.see(&y);
            for c in &sel {
                if let Some(t) = tokens_of.get_mut(c.expert as usize) {
                    t.extend_from_slice(x);
                }
            }
        }
        let output = output.params::<A>()?;

        let routed: Vec<Expert<'_, W>> =
            (0..n_experts).map(|i| layer.experts().expert(i)).collect::<Result<_>>()?;
        let ranges: Vec<ExpertRanges> = routed
            .iter()
            .zip(&tokens_of)
            .map(|(e, t)| observe(e, if t.is_empty() { calibration } else { t }))
            .collect();
        let shared_ranges = layer.shared().map(|s| observe(&s.expert, calibration));
        let mut expert_out = Range::EMPTY;
        for r in ranges.iter().chain(shared_ranges.as_ref()) {
            expert_out.see(&[r.out.min, r.out.max]);
        }
        let expert_out = match base {
            Some(b) => b.expert_out,
            None => expert_out.params::<A>()?,
        };

        let logit = QuantParams::new(1.0 / (1u32 << LOGIT_FRAC_BITS) as f32, 0)?;
        let experts = match base {
            Some(b) if b.experts.len() == routed.len() => b.experts.clone(),
            Some(b) => {
                return Err(Error::DimMismatch {
                    what: What::Experts,
                    expected: routed.len(),
                    actual: b.experts.len(),
                });
            }
            None => routed
                .iter()
                .zip(&ranges)
                .map(|(e, r)| quantize_expert(e, r, input, expert_out))
                .collect::<Result<Vec<_>>>()?,
        };
        let shared = match (layer.shared(), &shared_ranges) {
            (Some(s), Some(r)) => Some((
                quantize_expert(&s.expert, r, input, expert_out)?,
                s.gate.as_ref().map(|g| quantize_linear(g, input, logit)).transpose()?,
            )),
            _ => None,
        };
        let router = layer.router();
        let q15 = |v: f32| libm::roundf(v * ONE_Q15 as f32) as i32;
        let combine = Combine {
            expert_zp: expert_out.zero_point,
            multiplier: Multiplier::from_scale(
                expert_out.scale as f64 / (output.scale as f64 * ONE_Q15 as f64),
            )?,
            out_zp: output.zero_point,
        };
        Ok(QMoeBuf {
            input,
            output,
            expert_out,
            gate: quantize_linear(layer.gate(), input, logit)?,
            experts,
            shared,
            rule: *router.rule(),
            bias_q15: router.bias().map(|b| b.iter().map(|&v| q15(v)).collect()),
            scaling_q15: q15(router.scaling()),
            combine,
            float_gate: None,
        })
    }

    /// Views of the routed experts, for [`QMoeBuf::layer`].
    pub fn expert_views(&self) -> Result<Vec<QExpert<'_, A>>> {
        self.experts.iter().map(|e| e.view()).collect()
    }

    /// The runnable layer over `experts` (from [`QMoeBuf::expert_views`]).
    pub fn layer<'a>(&'a self, experts: &'a [QExpert<'a, A>]) -> Result<QMoeLayer<'a, A>> {
        let shared = match &self.shared {
            Some((e, g)) => {
                Some(QSharedExpert { expert: e.view()?, gate: g.as_ref().map(|g| g.view()).transpose()? })
            }
            None => None,
        };
        if let Some(f) = &self.float_gate {
            let router = Router::new(self.rule, f.bias.as_deref(), f.scaling)?;
            let gate = match &f.weights {
                FloatWeights::F32(w) => FloatGate::F32(w.view()?),
                FloatWeights::F16(w) => FloatGate::F16(w.view()?),
            };
            return QMoeLayer::with_float_gate(gate, router, self.input, experts, shared, self.combine);
        }
        let router = IntRouter::new(self.rule, self.bias_q15.as_deref(), self.scaling_q15)?;
        QMoeLayer::new(self.gate.view()?, router, experts, shared, self.combine)
    }
}
