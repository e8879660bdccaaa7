//! Feed-forward experts: an MLP (`down(act(up x))`) or a gated unit
//! (`down(act(gate x) * up x)`; SwiGLU with `Silu`, Mixtral's
//! `w2(silu(w1 x) * w3 x)` with `gate = w1`, `up = w3`, `down = w2`).
//!
//! [`Expert`] runs f32 or f16 weights in f32; [`QExpert`] runs int8 or Q15.
//! Both borrow their weights and compute into caller-provided buffers.
//!
//! ```
//! use micromoe::expert::Expert;
//! use micromoe::kernels::{Activation, Linear};
//! // up: (2, 1), down: (1, 2): y = relu(x) - relu(-x) = x
//! let up = Linear::new(&[1.0f32, -1.0], None, 2, 1).unwrap();
//! let down = Linear::new(&[1.0f32, -1.0], None, 1, 2).unwrap();
//! let e = Expert::mlp(up, down, Activation::Relu).unwrap();
//! let (mut y, mut hidden) = ([0.0], [0.0; 2]);
//! e.forward(&[-3.0], &mut y, &mut hidden);
//! assert_eq!(y, [-3.0]);
//! ```

use crate::error::{Error, Result, What, check_dim};
use crate::kernels::{Activation, FloatWeight, IntKernel, Linear, MulParams, QLinear};
use crate::quant::Multiplier;

/// The shape of an expert, generic over its linear layer type.
#[derive(Debug, Clone, Copy)]
pub enum Ffn<L> {
    /// `down(act(up x))`.
    Mlp {
        /// `(hidden, in)`.
        up: L,
        /// Element-wise non-linearity.
        act: Activation,
        /// `(out, hidden)`.
        down: L,
    },
    /// `down(act(gate x) * up x)`.
    Gated {
        /// `(hidden, in)`, Mixtral `w1`, HF `gate_proj`.
        gate: L,
        /// `(hidden, in)`, Mixtral `w3`, HF `up_proj`.
        up: L,
        /// Applied to `gate x`.
        act: Activation,
        /// `(out, hidden)`, Mixtral `w2`, HF `down_proj`.
        down: L,
    },
}

/// Width of a layer's output (`rows`) and input (`cols`).
pub trait Dims {
    /// Output width.
    fn rows(&self) -> usize;
    /// Input width.
    fn cols(&self) -> usize;
}

impl<W: FloatWeight> Dims for Linear<'_, W> {
    fn rows(&self) -> usize {
        Linear::rows(self)
    }
    fn cols(&self) -> usize {
        Linear::cols(self)
    }
}

impl<A: IntKernel> Dims for QLinear<'_, A> {
    fn rows(&self) -> usize {
        QLinear::rows(self)
    }
    fn cols(&self) -> usize {
        QLinear::cols(self)
    }
}

impl<L: Dims> Ffn<L> {
    fn check(&self) -> Result<()> {
        match self {
            Ffn::Mlp { up, down, .. } => check_dim(What::Weight, up.rows(), down.cols()),
            Ffn::Gated { gate, up, down, .. } => {
                check_dim(What::Weight, gate.rows(), up.rows())?;
                check_dim(What::Weight, gate.cols(), up.cols())?;
                check_dim(What::Weight, up.rows(), down.cols())
            }
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        match self {
            Ffn::Mlp { up, .. } | Ffn::Gated { up, .. } => up.cols(),
        }
    }

    /// Hidden width.
    pub fn hidden_dim(&self) -> usize {
        match self {
            Ffn::Mlp { up, .. } | Ffn::Gated { up, .. } => up.rows(),
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        match self {
            Ffn::Mlp { down, .. } | Ffn::Gated { down, .. } => down.rows(),
        }
    }

    /// Hidden buffers needed (1 for an MLP, 2 for a gated unit).
    pub fn hidden_buffers(&self) -> usize {
        match self {
            Ffn::Mlp { .. } => 1,
            Ffn::Gated { .. } => 2,
        }
    }

    /// Multiply-accumulates per token.
    pub fn macs(&self) -> u64 {
        let (i, h, o) = (self.in_dim() as u64, self.hidden_dim() as u64, self.out_dim() as u64);
        self.hidden_buffers() as u64 * i * h + h * o
    }
}

/// A linear layer as an [`Ffn`] drives it on the float path: `input`
/// multiplies the FFN's input `X` (a slice; the decoder's
/// [`Input`](crate::model::Input), quantized once for every int8 product
/// that reads it), `hidden` the FFN's hidden vector, with `B` as work space
/// (the decoder's int8 matrices quantize the hidden vector there).
pub(crate) trait Product<X, B: ?Sized> {
    /// `y = W x (+ b)`.
    fn input(&self, x: &mut X, y: &mut [f32]);
    /// `y = W h (+ b)`.
    fn hidden(&self, h: &[f32], y: &mut [f32], work: &mut B);
}

impl<'x, W: FloatWeight> Product<&'x [f32], ()> for Linear<'_, W> {
    #[inline(always)]
    fn input(&self, x: &mut &'x [f32], y: &mut [f32]) {
        self.forward(x, y);
    }
    #[inline(always)]
    fn hidden(&self, h: &[f32], y: &mut [f32], _: &mut ()) {
        self.forward(h, y);
    }
}

/// Several tokens' inputs, `(tokens, in)` row-major, as an [`Ffn`] reads
/// them in one pass (the decoder's prefill): products over the batch.
#[cfg(feature = "std")]
pub(crate) struct Batch<'x>(pub &'x [f32]);

impl<L> Ffn<L> {
    /// `y = ffn(x)` on the float path, the one FFN body of every float
    /// expert (the stack's [`Expert`], the decoder's SwiGLU experts):
    /// `x` holds `tokens` inputs (1, or a prefill's [`Batch`]); `h1` and
    /// `h2` hold their hidden vectors (at least `tokens *`
    /// [`Ffn::hidden_dim`] each, `h2` for gated units only; the caller
    /// checks: a short buffer computes garbage, never panics).
    #[inline(always)]
    pub(crate) fn forward_with<X, B: ?Sized>(
        &self,
        x: &mut X,
        tokens: usize,
        y: &mut [f32],
        (h1, h2): (&mut [f32], &mut [f32]),
        work: &mut B,
    ) where
        L: Product<X, B> + Dims,
    {
        let inner = self.hidden_dim().saturating_mul(tokens);
        let n1 = inner.min(h1.len());
        let h1 = &mut h1[..n1];
        match self {
            Ffn::Mlp { up, act, down } => {
                up.input(x, h1);
                act.apply(h1);
                down.hidden(h1, y, work);
            }
            Ffn::Gated { gate, up, act, down } => {
                let n2 = inner.min(h2.len());
                let h2 = &mut h2[..n2];
                gate.input(x, h1);
                up.input(x, h2);
                act.gate(h1, h2);
                down.hidden(h1, y, work);
            }
        }
    }
}

/// An expert with f32 or f16 weights (f32 arithmetic).
#[derive(Debug, Clone, Copy)]
pub struct Expert<'a, W> {
    ffn: Ffn<Linear<'a, W>>,
}

impl<'a, W: FloatWeight> Expert<'a, W> {
    /// `down(act(up x))`.
    pub fn mlp(up: Linear<'a, W>, down: Linear<'a, W>, act: Activation) -> Result<Self> {
        let ffn = Ffn::Mlp { up, act, down };
        ffn.check()?;
        Ok(Expert { ffn })
    }

    /// `down(act(gate x) * up x)`.
    pub fn gated(
        gate: Linear<'a, W>,
        up: Linear<'a, W>,
        down: Linear<'a, W>,
        act: Activation,
    ) -> Result<Self> {
        let ffn = Ffn::Gated { gate, up, act, down };
        ffn.check()?;
        Ok(Expert { ffn })
    }

    /// The layers.
    pub fn ffn(&self) -> &Ffn<Linear<'a, W>> {
        &self.ffn
    }

    /// f32 values of scratch [`Expert::forward`] needs in `hidden`.
    pub fn hidden_len(&self) -> usize {
        self.ffn.hidden_buffers() * self.ffn.hidden_dim()
    }

    /// `y = expert(x)`; `x`: in, `y`: out, `hidden`: [`Expert::hidden_len`]
    /// elements (checked by the caller; a short buffer computes garbage,
    /// never panics).
    pub fn forward(&self, x: &[f32], y: &mut [f32], hidden: &mut [f32]) {
        let halves = hidden.split_at_mut(self.ffn.hidden_dim().min(hidden.len()));
        self.ffn.forward_with(&mut { x }, 1, y, halves, &mut ());
    }

    /// [`Expert::forward`] for several tokens at once (host batches): `xs`
    /// `(tokens, in)`, `ys` `(tokens, out)`, `hidden` `tokens *`
    /// [`Expert::hidden_len`] values; each weight row serves several tokens
    /// while cached. The same bits as token by token.
    pub fn forward_batch(&self, xs: &[f32], ys: &mut [f32], hidden: &mut [f32]) {
        let tokens = xs.len() / self.ffn.in_dim().max(1);
        let inner = self.ffn.hidden_dim();
        let (h1, h2) = hidden.split_at_mut((tokens * inner).min(hidden.len()));
        match &self.ffn {
            Ffn::Mlp { up, act, down } => {
                up.forward_batch(xs, h1);
                act.apply(h1);
                down.forward_batch(h1, ys);
            }
            Ffn::Gated { gate, up, act, down } => {
                gate.forward_batch(xs, h1);
                up.forward_batch(xs, h2);
                act.gate(h1, h2);
                down.forward_batch(h1, ys);
            }
        }
    }
}

/// An integer-path non-linearity.
#[derive(Debug, Clone, Copy)]
pub enum QActivation<'a, A> {
    /// `max(x, zero_point)`: same quantization in and out.
    Relu,
    /// A table from [`build_lut`](crate::quant::build_lut).
    Lut(&'a [A]),
}

impl<A: IntKernel> QActivation<'_, A> {
    fn apply(&self, xs: &mut [A], zp: i32) {
        match self {
            QActivation::Relu => xs.iter_mut().for_each(|x| *x = A::saturate(x.get().max(zp))),
            QActivation::Lut(lut) => xs.iter_mut().for_each(|x| *x = x.lookup(lut)),
        }
    }
}

/// An expert on the integer path: int8 (`A = i8`) or Q15 (`A = i16`).
#[derive(Debug, Clone, Copy)]
pub struct QExpert<'a, A: IntKernel> {
    up: QLinear<'a, A>,
    act: QActivation<'a, A>,
    /// Gated units: the gate layer and the product's requantization.
    gate: Option<(QLinear<'a, A>, MulParams)>,
    down: QLinear<'a, A>,
}

impl<'a, A: IntKernel> QExpert<'a, A> {
    /// `down(act(up x))`. With `Relu`, `down` must take `up`'s output
    /// quantization (checked by zero point).
    pub fn mlp(up: QLinear<'a, A>, act: QActivation<'a, A>, down: QLinear<'a, A>) -> Result<Self> {
        check_act(&act)?;
        Ffn::Mlp { up, act: Activation::Relu, down }.check()?;
        if matches!(act, QActivation::Relu) && down.input_zp() != up.output_zp() {
            return Err(Error::OutOfRange { what: What::ZeroPoint, index: 0 });
        }
        Ok(QExpert { up, act, gate: None, down })
    }

    /// `down(mul(act(gate x), up x))`; zero points must chain:
    /// `mul.b_zp` is `up`'s output, `mul.out_zp` is `down`'s input (and with
    /// `Relu`, `mul.a_zp` is `gate`'s output).
    pub fn gated(
        gate: QLinear<'a, A>,
        up: QLinear<'a, A>,
        act: QActivation<'a, A>,
        mul: MulParams,
        down: QLinear<'a, A>,
    ) -> Result<Self> {
        check_act(&act)?;
        Ffn::Gated { gate, up, act: Activation::Relu, down }.check()?;
        let relu_ok = !matches!(act, QActivation::Relu) || mul.a_zp == gate.output_zp();
        let a_zp_ok = if A::LUT_LEN == 256 { (A::MIN..=A::MAX).contains(&mul.a_zp) } else { mul.a_zp == 0 };
        if !relu_ok || !a_zp_ok || mul.b_zp != up.output_zp() || mul.out_zp != down.input_zp() {
            return Err(Error::OutOfRange { what: What::ZeroPoint, index: 0 });
        }
        let m = mul.multiplier;
        if Multiplier::new(m.multiplier, m.shift).is_err() {
            return Err(Error::OutOfRange { what: What::Requant, index: 0 });
        }
        Ok(QExpert { up, act, gate: Some((gate, mul)), down })
    }

    fn dims(&self) -> Ffn<QLinear<'a, A>> {
        match self.gate {
            None => Ffn::Mlp { up: self.up, act: Activation::Relu, down: self.down },
            Some((gate, _)) => Ffn::Gated { gate, up: self.up, act: Activation::Relu, down: self.down },
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.up.cols()
    }

    /// Zero point the expert expects its input in.
    pub fn input_zp(&self) -> i32 {
        self.up.input_zp()
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.down.rows()
    }

    /// The output layer (its output zero point is the expert's).
    pub fn down(&self) -> &QLinear<'a, A> {
        &self.down
    }

    /// Multiply-accumulates per token.
    pub fn macs(&self) -> u64 {
        self.dims().macs()
    }

    /// Values of `A` that [`QExpert::forward`] needs in `hidden`.
    pub fn hidden_len(&self) -> usize {
        let d = self.dims();
        d.hidden_buffers() * d.hidden_dim()
    }

    /// `y = expert(x)`, all integer; buffers as for [`Expert::forward`].
    pub fn forward(&self, x: &[A], y: &mut [A], hidden: &mut [A]) {
        self.run(x, y, hidden, |lin, x, y| lin.forward(x, y));
    }

    /// [`QExpert::forward`] with `work` for the products
    /// ([`QLinear::forward_in`]: [`expand_words`](crate::kernels::expand_words)
    /// of the widest input) instead of buffers on the stack.
    pub fn forward_in(&self, x: &[A], y: &mut [A], hidden: &mut [A], work: &mut [u32]) {
        self.run(x, y, hidden, |lin, x, y| lin.forward_in(x, y, work));
    }

    // Generic in the product, so that a firmware links only the one it uses.
    #[inline(always)]
    fn run(
        &self,
        x: &[A],
        y: &mut [A],
        hidden: &mut [A],
        mut product: impl FnMut(&QLinear<'_, A>, &[A], &mut [A]),
    ) {
        let (h1, h2) = hidden.split_at_mut(self.up.rows().min(hidden.len()));
        match &self.gate {
            None => {
                product(&self.up, x, h1);
                self.act.apply(h1, self.up.output_zp());
                product(&self.down, h1, y);
            }
            Some((gate, mul)) => {
                product(gate, x, h1);
                self.act.apply(h1, gate.output_zp());
                product(&self.up, x, h2);
                mul.apply(h1, h2);
                product(&self.down, h1, y);
            }
        }
    }
}

fn check_act<A: IntKernel>(act: &QActivation<'_, A>) -> Result<()> {
    match act {
        QActivation::Lut(lut) if lut.len() != A::LUT_LEN => {
            Err(Error::Shape { what: What::Lut, expected: A::LUT_LEN, actual: lut.len() })
        }
        _ => Ok(()),
    }
}
