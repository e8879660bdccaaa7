//! The `.moe` container: lossless write -> parse, and every malformed model
//! refused with a specific error, never a panic.

mod common;

use common::{Fixture, model, to_f16};
use micromoe::Model;
use micromoe::build::QMoeBuf;
use micromoe::error::{Error, Field, What};
use micromoe::format::write::AlignedBytes;
use micromoe::format::{LayerDtype, layout};
use micromoe::model::write::{LayerSpec, ModelSpec, Task, write};
use micromoe::model::{Resolved, required_scratch};

fn float_spec(name: &str, gate: LayerDtype, experts: LayerDtype) -> (Fixture, ModelSpec) {
    let fx = Fixture::load(name);
    let layer = model(&fx);
    (fx, ModelSpec::stack(Task::Regress, vec![LayerSpec::Float { layer, gate, experts }]))
}

fn int_spec(name: &str, q15: bool) -> (Fixture, ModelSpec) {
    let fx = Fixture::load(name);
    let m = model(&fx);
    let views = m.expert_views().unwrap();
    let layer = m.layer(&views).unwrap();
    let spec = if q15 {
        LayerSpec::Q15(QMoeBuf::quantize(&layer, fx.f32("x")).unwrap())
    } else {
        LayerSpec::Int8(QMoeBuf::quantize(&layer, fx.f32("x")).unwrap())
    };
    (fx, ModelSpec::stack(Task::Regress, vec![spec]))
}

/// Runs every fixture token through the parsed model; returns outputs and experts.
fn run(bytes: &[u8], fx: &Fixture) -> Vec<(Vec<f32>, Vec<u16>)> {
    let aligned = AlignedBytes::from(bytes);
    let model = Model::parse(&aligned).unwrap();
    let mut scratch = vec![0u8; model.scratch_bytes()];
    (0..fx.tokens())
        .map(|t| {
            let mut y = vec![0.0; model.output_dim()];
            let mut experts = vec![];
            model
                .infer_observed(fx.row("x", t), &mut y, &mut scratch, |s| {
                    experts = s.selection.iter().map(|c| c.expert).collect()
                })
                .unwrap();
            (y, experts)
        })
        .collect()
}

#[test]
fn float_models_round_trip_bit_for_bit() {
    for (name, gate, experts, conv) in [
        ("qwen2moe_h16_e4_k1_norm", LayerDtype::F32, LayerDtype::F32, None),
        ("glam_mlp_relu_h24_e8_k2", LayerDtype::F32, LayerDtype::F32, None),
        ("mixtral_h32_e8_k2", LayerDtype::F16, LayerDtype::F16, Some(to_f16 as fn(f32) -> _)),
    ] {
        let (fx, spec) = float_spec(name, gate, experts);
        let bytes = write(&spec).unwrap();
        // The same layer in memory, with the weights the file holds.
        let m = model(&fx);
        let got = run(&bytes, &fx);
        let mut scratch = vec![0u8; 4096];
        for (t, (y, experts)) in got.iter().enumerate() {
            let mut want = vec![0.0f32; y.len()];
            let sel = match conv {
                None => {
                    let views = m.expert_views().unwrap();
                    m.layer(&views).unwrap().infer(fx.row("x", t), &mut want, &mut scratch).unwrap()
                }
                Some(c) => {
                    let m16 = m.convert(c);
                    let views = m16.expert_views().unwrap();
                    m16.layer(&views).unwrap().infer(fx.row("x", t), &mut want, &mut scratch).unwrap()
                }
            };
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name} {t}"
            );
            assert_eq!(experts, &sel.iter().map(|c| c.expert).collect::<Vec<_>>());
        }
        // Every stored weight is the source weight (f32) or its f16 rounding.
        let aligned = AlignedBytes::from(&bytes[..]);
        let parsed = Model::parse(&aligned).unwrap();
        let key = |expert, role| micromoe::format::Key { layer: 0, expert, role, part: layout::part::WEIGHT };
        let up = parsed.table().find(key(1, layout::role::UP)).unwrap();
        match conv {
            None => assert_eq!(up.slice::<f32>().unwrap(), &m.experts[1].up.weights[..]),
            Some(_) => {
                let w: Vec<_> = m.experts[1].up.weights.iter().map(|&v| to_f16(v)).collect();
                assert_eq!(up.slice::<micromoe::quant::f16>().unwrap(), &w[..]);
            }
        }
        // Views rebuilt from the file take their sizes from the records:
        // the same scratch and work as the layer in memory.
        if conv.is_none() {
            let views = m.expert_views().unwrap();
            let mem = m.layer(&views).unwrap();
            let Ok(micromoe::model::Layer::F32(file)) = parsed.layer(0) else { panic!("an f32 layer") };
            assert_eq!(file.scratch_bytes(), mem.scratch_bytes());
            let sel = mem.infer(fx.row("x", 0), &mut vec![0.0; mem.out_dim()], &mut scratch).unwrap();
            assert_eq!(file.macs(&sel), mem.macs(&sel));
        }
        // Writing is deterministic.
        assert_eq!(write(&spec).unwrap(), bytes);
    }
}

#[test]
fn integer_models_round_trip_bit_for_bit() {
    for q15 in [false, true] {
        let (fx, spec) = int_spec("qwen2moe_h24_e6_k3_norm", q15);
        let bytes = write(&spec).unwrap();
        let got = run(&bytes, &fx);
        for (t, (y, experts)) in got.iter().enumerate() {
            let mut want = vec![0.0f32; y.len()];
            let sel = match &spec.layers[0] {
                LayerSpec::Int8(q) => infer_int(q, fx.row("x", t), &mut want),
                LayerSpec::Q15(q) => infer_int(q, fx.row("x", t), &mut want),
                _ => unreachable!(),
            };
            assert_eq!(y, &want, "q15={q15} token {t}");
            assert_eq!(experts, &sel);
        }
    }
}

#[test]
fn integer_views_from_a_file_have_the_sizes_of_the_layer_in_memory() {
    let (fx, spec) = int_spec("qwen2moe_h24_e6_k3_norm", true);
    let bytes = write(&spec).unwrap();
    let aligned = AlignedBytes::from(&bytes[..]);
    let parsed = Model::parse(&aligned).unwrap();
    let LayerSpec::Q15(q) = &spec.layers[0] else { unreachable!() };
    let views = q.expert_views().unwrap();
    let mem = q.layer(&views).unwrap();
    let Ok(micromoe::model::Layer::Q15(file, input, _)) = parsed.layer(0) else { panic!("a Q15 layer") };
    assert_eq!(file.scratch_bytes(), mem.scratch_bytes());
    let mut x = vec![0i16; 24];
    input.quantize_slice(fx.row("x", 0), &mut x).unwrap();
    let mut scratch = vec![0u8; mem.scratch_bytes()];
    let sel = mem.infer(&x, &mut [0; 24], &mut scratch).unwrap();
    assert_eq!(file.macs(&sel), mem.macs(&sel));
    // The model's per-step figures come from the records: the same.
    let mut step = (0, 0);
    let mut scratch = vec![0u8; parsed.scratch_bytes()];
    let mut y = vec![0.0; parsed.output_dim()];
    parsed.infer_observed(fx.row("x", 0), &mut y, &mut scratch, |s| step = (s.macs, s.macs_dense)).unwrap();
    assert_eq!(step, mem.macs(&sel));
}

fn infer_int<A: micromoe::kernels::IntKernel>(q: &QMoeBuf<A>, x: &[f32], y: &mut [f32]) -> Vec<u16> {
    let views = q.expert_views().unwrap();
    let layer = q.layer(&views).unwrap();
    let mut scratch = vec![0u8; layer.scratch_bytes()];
    let (mut xq, mut yq) = (vec![A::default(); x.len()], vec![A::default(); y.len()]);
    q.input.quantize_slice(x, &mut xq).unwrap();
    let sel = layer.infer(&xq, &mut yq, &mut scratch).unwrap();
    q.output.dequantize_slice(&yq, y).unwrap();
    sel.iter().map(|c| c.expert).collect()
}

/// Made once (quantization is most of these tests' time under Miri).
fn small_model() -> Vec<u8> {
    static MODEL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let (_, spec) = int_spec("switch_mlp_gelu_h16_e4", false);
            write(&spec).unwrap()
        })
        .clone()
}

fn parse(bytes: &[u8]) -> Result<(), Error> {
    let aligned = AlignedBytes::from(bytes);
    Model::parse(&aligned).map(|_| ())
}

/// Rewrites the checksum so a change reaches the checks behind it (a
/// version this build does not read keeps its trailer).
fn reseal(b: &mut [u8]) {
    layout::seal(b);
}

#[test]
fn every_truncation_is_refused() {
    let bytes = small_model();
    parse(&bytes).unwrap();
    // Miri interprets every checksummed byte: every 1499th length there.
    for n in (0..bytes.len()).step_by(if cfg!(miri) { 1499 } else { 1 }) {
        match parse(&bytes[..n]) {
            Err(Error::Truncated { actual, .. }) => assert_eq!(actual, n),
            other => panic!("truncated to {n}: {other:?}"),
        }
    }
}

#[test]
fn every_bit_flip_is_refused() {
    let bytes = small_model();
    let mut b = bytes.clone();
    // Under Miri every 1499th byte (all eight bits of it).
    for i in (0..b.len()).step_by(if cfg!(miri) { 1499 } else { 1 }) {
        for bit in 0..8 {
            b[i] ^= 1 << bit;
            let r = parse(&b);
            assert!(r.is_err(), "flip {i}.{bit} accepted");
            if i >= 12 {
                assert!(
                    matches!(
                        r,
                        Err(Error::Checksum { .. })
                            | Err(Error::Truncated { .. })
                            | Err(Error::BadField { .. })
                    ),
                    "{i}.{bit}: {r:?}"
                );
            }
            b[i] ^= 1 << bit;
        }
    }
}

#[test]
fn header_damage_gets_specific_errors() {
    let bytes = small_model();
    let edit = |at: usize, v: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + v.len()].copy_from_slice(v);
        reseal(&mut b);
        parse(&b)
    };
    assert_eq!(edit(0, b"MICROMOF"), Err(Error::BadMagic));
    assert_eq!(edit(8, &3u16.to_le_bytes()), Err(Error::Version { found: 3 }));
    assert_eq!(edit(8, &0u16.to_le_bytes()), Err(Error::Version { found: 0 }));
    assert_eq!(edit(16, &7u32.to_le_bytes()), Err(Error::BadField { field: Field::Arch, layer: 0 }));
    assert_eq!(edit(32, &0u32.to_le_bytes()), Err(Error::BadField { field: Field::Layers, layer: 0 }));
    assert_eq!(edit(36, &u32::MAX.to_le_bytes()), Err(Error::BadField { field: Field::Offsets, layer: 0 }));
    assert_eq!(edit(56, &[1]), Err(Error::BadField { field: Field::Reserved, layer: 0 }));
    // Huge dimensions in the layer record.
    assert_eq!(edit(64, &u32::MAX.to_le_bytes()), Err(Error::BadField { field: Field::Dims, layer: 0 }));
    assert_eq!(
        edit(64 + 8, &0x4000_0000u32.to_le_bytes()),
        Err(Error::BadField { field: Field::Dims, layer: 0 })
    );
    // k above the number of experts.
    assert_eq!(edit(64 + 16, &9u32.to_le_bytes()), Err(Error::BadField { field: Field::Routing, layer: 0 }));
    // A tensor claiming more rows than its data holds.
    let table = 64 + 96;
    let r = edit(table + 8, &0x0100_0000u32.to_le_bytes());
    assert!(matches!(r, Err(Error::BadTensor { index: 0, .. })), "{r:?}");
    // A tensor pointing past the end, or at a misaligned offset.
    let r = edit(table + 16, &0x7FFF_FFF0u32.to_le_bytes());
    assert!(matches!(r, Err(Error::BadTensor { index: 0, .. })), "{r:?}");
    let r = edit(
        table + 16 + 32,
        &(u32::from_le_bytes(bytes[table + 48..table + 52].try_into().unwrap()) + 4).to_le_bytes(),
    );
    assert!(matches!(r, Err(Error::BadTensor { index: 1, .. })), "{r:?}");
    // Two entries swapped out of order.
    let mut b = bytes.clone();
    let (e0, e1) = (table..table + 32, table + 32..table + 64);
    let first: Vec<u8> = b[e0.clone()].to_vec();
    b.copy_within(e1.clone(), e0.start);
    b[e1].copy_from_slice(&first);
    reseal(&mut b);
    assert!(matches!(parse(&b), Err(Error::BadTensor { index: 1, .. })), "{:?}", parse(&b));
}

#[test]
fn misaligned_buffers_and_wrong_inputs_are_refused() {
    let bytes = small_model();
    let mut buf = vec![0u8; bytes.len() + 32];
    let start = buf.as_ptr().align_offset(16);
    for shift in 1..16 {
        buf[start + shift..start + shift + bytes.len()].copy_from_slice(&bytes);
        assert_eq!(
            Model::parse(&buf[start + shift..start + shift + bytes.len()]).unwrap_err(),
            Error::Misaligned { offset: shift }
        );
    }
    let aligned = AlignedBytes::from(&bytes[..]);
    let model = Model::parse(&aligned).unwrap();
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let mut y = vec![0.0; model.output_dim()];
    let x = vec![0.5; model.input_dim()];
    assert_eq!(
        model.infer(&x[1..], &mut y, &mut scratch).unwrap_err(),
        Error::Shape { what: What::Input, expected: x.len(), actual: x.len() - 1 }
    );
    assert!(matches!(
        model.infer(&x, &mut y[1..], &mut scratch),
        Err(Error::Shape { what: What::Output, .. })
    ));
    let mut nan = x.clone();
    nan[3] = f32::NAN;
    assert_eq!(
        model.infer(&nan, &mut y, &mut scratch).unwrap_err(),
        Error::NonFinite { what: What::Input, index: 3 }
    );
    let need = model.scratch_bytes();
    assert_eq!(required_scratch(&bytes), Ok(need));
    assert_eq!(
        model.infer(&x, &mut y, &mut scratch[..need - 1]).unwrap_err(),
        Error::ScratchTooSmall { needed: need, actual: need - 1 }
    );
    model.infer(&x, &mut y, &mut scratch[..need]).unwrap();
}

/// A bounded stand-in for the fuzz target that runs on stable in CI:
/// random byte edits with a valid checksum, then parse and (if accepted) infer.
#[test]
fn random_edits_never_panic() {
    let bytes = small_model();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..if cfg!(miri) { 30 } else { 3000 } {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % (b.len() as u64 - 4)) as usize;
            // Aim most edits at the header, records and table, where the checks are.
            let at = if next() % 4 != 0 { at % (64 + 96 + 32 * 20) } else { at };
            b[at] = next() as u8;
        }
        reseal(&mut b);
        let aligned = AlignedBytes::from(&b[..]);
        match Model::parse(&aligned) {
            Ok(model) => {
                accepted += 1;
                let mut scratch = vec![0u8; model.scratch_bytes().min(1 << 20)];
                let mut y = vec![0.0; model.output_dim().min(1 << 16)];
                let x = vec![0.25; model.input_dim().min(1 << 16)];
                let _ = model.infer(&x, &mut y, &mut scratch);
            }
            Err(_) => refused += 1,
        }
    }
    println!("random edits: {accepted} accepted, {refused} refused");
    assert!(refused > if cfg!(miri) { 10 } else { 1000 });
}

/// An f16 gate routing int8 experts (mixed types in one layer): the file
/// behaves exactly like the layer in memory, and routing follows the float
/// gate, so it picks PyTorch's experts wherever the input's quantization
/// does not cross a tie.
#[test]
fn float_gate_over_integer_experts_round_trips() {
    let fx = Fixture::load("qwen2moe_h24_e6_k3_norm");
    let m = model(&fx);
    let views = m.expert_views().unwrap();
    let float = m.layer(&views).unwrap();
    let q = QMoeBuf::<i8>::quantize(&float, fx.f32("x")).unwrap().with_float_gate(&float, true);
    let spec = ModelSpec::stack(Task::Regress, vec![LayerSpec::Int8(q.clone())]);
    let bytes = write(&spec).unwrap();
    let aligned = AlignedBytes::from(&bytes[..]);
    let parsed = Model::parse(&aligned).unwrap();
    let info = parsed.layer_info(0).unwrap();
    assert_eq!((info.gate_dtype, info.expert_dtype), (LayerDtype::F16, LayerDtype::Int8));
    let got = run(&bytes, &fx);
    let mut same = 0;
    for (t, (y, experts)) in got.iter().enumerate() {
        let mut want = vec![0.0f32; y.len()];
        let sel = infer_int(&q, fx.row("x", t), &mut want);
        assert_eq!(y, &want, "token {t}");
        assert_eq!(experts, &sel);
        same += (experts == &fx.experts_row("experts", t)) as usize;
    }
    println!("f16 gate over int8 experts: {same}/{} tokens route as PyTorch", got.len());
    assert!(same + 1 >= got.len(), "{same}");
}

/// Every routed expert of a layer must hold expert 0's tensors in the same
/// order (inference finds expert `i`'s tensors by position): a block that
/// differs is refused at parse, naming the entry.
#[test]
fn an_expert_with_other_tensors_than_expert_0_is_refused() {
    let bytes = small_model();
    let table = 64 + 96;
    let n = u32::from_le_bytes(bytes[36..40].try_into().unwrap()) as usize;
    let at = (0..n)
        .map(|i| table + 32 * i)
        .find(|&e| bytes[e + 2..e + 4] == 1u16.to_le_bytes() && bytes[e + 4] == 3 && bytes[e + 5] == 3)
        .expect("expert 1's down-projection shifts");
    let mut b = bytes.clone();
    // Still sorted and a valid key (a selection bias), but not expert 0's pattern.
    b[at + 4] = 5;
    b[at + 5] = 0;
    reseal(&mut b);
    assert_eq!(
        parse(&b),
        Err(Error::BadTensor { index: (at - table) / 32, problem: micromoe::error::TensorProblem::Pattern })
    );
}

/// The writer refuses such a layer in the first place: experts whose
/// biases differ.
#[test]
fn the_writer_refuses_experts_with_different_biases() {
    use micromoe::Rule;
    use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
    use micromoe::kernels::Activation;
    let lin = |rows, cols, bias: bool| {
        LinearBuf::new(vec![0.5; rows * cols], bias.then(|| vec![0.1; rows]), rows, cols)
    };
    let experts = vec![
        ExpertBuf::mlp(lin(4, 2, true), lin(3, 4, false), Activation::Relu),
        ExpertBuf::mlp(lin(4, 2, false), lin(3, 4, false), Activation::Relu),
    ];
    let layer = MoeBuf::new(lin(2, 2, false), experts, Rule::switch(2));
    let spec = ModelSpec::stack(
        Task::Classify,
        vec![LayerSpec::Float { layer, gate: LayerDtype::F32, experts: LayerDtype::F32 }],
    );
    assert_eq!(write(&spec).unwrap_err(), Error::BadField { field: Field::Dims, layer: 0 });
}

/// The integer entry point: quantized in, quantized out, bit for bit what
/// `infer` computes between its quantization and dequantization, over two
/// chained layers; refused by name where the quantization does not chain
/// or the type differs.
#[test]
fn infer_int_is_infer_without_the_float_edges() {
    fn check<A: micromoe::model::IntPath + Default>(q15: bool)
    where
        A::Bias: micromoe::format::Elem,
    {
        let (fx, spec) = int_spec("qwen2moe_h24_e6_k3_norm", q15);
        let first = spec.layers[0].clone();
        let mut second = first.clone();
        let chained = |l: &mut LayerSpec, p| match l {
            LayerSpec::Int8(q) => q.input = p,
            LayerSpec::Q15(q) => q.input = p,
            _ => unreachable!(),
        };
        let out = |l: &LayerSpec| match l {
            LayerSpec::Int8(q) => q.output,
            LayerSpec::Q15(q) => q.output,
            _ => unreachable!(),
        };
        chained(&mut second, out(&first));
        let two = ModelSpec::stack(Task::Regress, vec![first.clone(), second]);
        let bytes = AlignedBytes::from(&write(&two).unwrap()[..]);
        let model = Model::parse(&bytes).unwrap();
        let (qin, qout) = (model.input_quant().unwrap(), model.output_quant().unwrap());
        let mut scratch = vec![0u8; model.scratch_bytes()];
        for t in 0..fx.tokens().min(if cfg!(miri) { 1 } else { 64 }) {
            let x = fx.row("x", t);
            let mut want = vec![0.0f32; model.output_dim()];
            model.infer(x, &mut want, &mut scratch).unwrap();
            let mut xq = vec![A::default(); x.len()];
            qin.quantize_slice(x, &mut xq).unwrap();
            let mut yq = vec![A::default(); model.output_dim()];
            model.infer_int(&xq, &mut yq, &mut scratch).unwrap();
            let mut got = vec![0.0f32; yq.len()];
            qout.dequantize_slice(&yq, &mut got).unwrap();
            assert_eq!(got, want, "token {t}");
            // The layers built once run the same bits.
            let mut built = vec![A::default(); yq.len()];
            Resolved::<2>::new(&model).unwrap().infer_int(&xq, &mut built, &mut scratch).unwrap();
            assert_eq!(built, yq, "token {t}, built layers");
        }
        assert_eq!(Resolved::<1>::new(&model).unwrap_err(), Error::TooManyLayers { layers: 2, capacity: 1 });
        // Built in place, and again: the same layers.
        let mut in_place = Resolved::<2>::empty(model);
        in_place.build().unwrap();
        in_place.build().unwrap();
        assert_eq!(in_place.layers().len(), 2);
        let x = fx.row("x", 0);
        let mut xq = vec![A::default(); x.len()];
        qin.quantize_slice(x, &mut xq).unwrap();
        let (mut a, mut b) = (vec![A::default(); model.output_dim()], vec![A::default(); model.output_dim()]);
        in_place.infer_int(&xq, &mut a, &mut scratch).unwrap();
        model.infer_int(&xq, &mut b, &mut scratch).unwrap();
        assert_eq!(a, b);
        // The integer path needs no room for float edges: its own, smaller size.
        let need = model.int_scratch_bytes();
        assert_eq!(Ok(need), micromoe::model::required_scratch_int(&bytes));
        assert!(need < model.scratch_bytes());
        let mut small = vec![0u8; need];
        in_place.infer_int(&xq, &mut a, &mut small).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            model.infer_int(&xq, &mut a, &mut small[..need - 1]),
            Err(Error::ScratchTooSmall { needed: need, actual: need - 1 })
        );
        // The second layer taking its own input quantization does not chain.
        let unchained = ModelSpec::stack(Task::Regress, vec![first.clone(), first]);
        let bytes = AlignedBytes::from(&write(&unchained).unwrap()[..]);
        let model = Model::parse(&bytes).unwrap();
        let mut yq = vec![A::default(); model.output_dim()];
        let xq = vec![A::default(); model.input_dim()];
        assert_eq!(model.infer_int(&xq, &mut yq, &mut scratch), Err(Error::IntegerPath { layer: 1 }));
        let built = Resolved::<2>::new(&model).unwrap();
        assert_eq!(built.infer_int(&xq, &mut yq, &mut scratch), Err(Error::IntegerPath { layer: 1 }));
    }
    check::<i8>(false);
    check::<i16>(true);
    // The wrong activation type for the model.
    let (_, spec) = int_spec("qwen2moe_h24_e6_k3_norm", false);
    let bytes = AlignedBytes::from(&write(&spec).unwrap()[..]);
    let model = Model::parse(&bytes).unwrap();
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let mut y = vec![0i16; model.output_dim()];
    let x = vec![0i16; model.input_dim()];
    assert_eq!(model.infer_int(&x, &mut y, &mut scratch), Err(Error::IntegerPath { layer: 0 }));
}

/// A version 1 container (CRC-32 trailer) made from a version 2 one: the
/// same bytes before the trailer, version 1, 4 bytes shorter.
fn as_version_1(v2: &[u8]) -> Vec<u8> {
    let mut b = v2[..v2.len() - layout::CHECK_LEN + layout::CRC_LEN].to_vec();
    b[8..10].copy_from_slice(&layout::VERSION_CRC32.to_le_bytes());
    let n = b.len() as u32;
    b[12..16].copy_from_slice(&n.to_le_bytes());
    let payload = b.len() - layout::CRC_LEN;
    let crc = layout::crc32(&b[..payload]);
    b[payload..].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
#[cfg_attr(miri, ignore = "a quantized fixture and a bitwise CRC: a minute under Miri, no unsafe code")]
fn version_1_files_parse_and_upgrade_to_the_same_model() {
    let v2 = small_model();
    let v1 = as_version_1(&v2);
    let (a1, a2) = (AlignedBytes::from(&v1[..]), AlignedBytes::from(&v2[..]));
    let (m1, m2) = (Model::parse(&a1).unwrap(), Model::parse(&a2).unwrap());
    // Same answers, bit for bit.
    let x: Vec<f32> = (0..m1.input_dim()).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |m: &Model| {
        let mut scratch = vec![0u8; m.scratch_bytes()];
        let mut y = vec![0f32; m.output_dim()];
        m.infer(&x, &mut y, &mut scratch).unwrap();
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(run(&m1), run(&m2));
    // `upgrade` gives back exactly what the writer writes, and leaves a
    // version 2 file as it is.
    assert_eq!(micromoe::format::write::upgrade(&a1).unwrap(), v2);
    assert_eq!(micromoe::format::write::upgrade(&a2).unwrap(), v2);
    // A corrupted version 1 file is refused, not resealed.
    let mut bad = v1.clone();
    bad[200] ^= 4;
    let bad = AlignedBytes::from(&bad[..]);
    assert!(matches!(micromoe::format::write::upgrade(&bad), Err(Error::Checksum { .. })));
    assert!(matches!(Model::parse(&bad), Err(Error::Checksum { .. })));
}

/// The version 2 checksum against the corruptions flash and files suffer:
/// every single-word change (guaranteed: each step is a bijection of each
/// lane), and seeded random 2- and 3-bit flips, bursts of up to 64 bits,
/// swapped words and erased (0x00 / 0xFF) blocks over a real model. A 64-bit
/// check misses a random corruption with odds of about 2^-64; any miss
/// here would be a structural weakness.
#[test]
fn the_checksum_catches_flips_bursts_swaps_and_erasures() {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_int8.moe")).unwrap();
    let payload = &bytes[..bytes.len() - layout::CHECK_LEN];
    let good = layout::checksum(payload);
    let n = payload.len();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |m: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % m as u64) as usize
    };
    let trials = if cfg!(miri) { 4 } else { 3000 };
    let mut b = payload.to_vec();
    let check = |b: &mut Vec<u8>, what: &str| {
        assert_ne!(layout::checksum(b), good, "{what} missed");
        b.copy_from_slice(payload);
    };
    // Every bit of a few words, and one random bit of many.
    let words: &[usize] = if cfg!(miri) { &[1] } else { &[0, 1, n / 8, n / 4 - 1] };
    for &w in words {
        for bit in (0..32).step_by(if cfg!(miri) { 9 } else { 1 }) {
            b[4 * w + bit / 8] ^= 1 << (bit % 8);
            check(&mut b, "one bit");
        }
    }
    for _ in 0..trials {
        let (i, j) = (next(n * 8), next(n * 8));
        if i / 8 == j / 8 {
            continue;
        }
        b[i / 8] ^= 1 << (i % 8);
        b[j / 8] ^= 1 << (j % 8);
        check(&mut b, "two bits");
        // Two flips of the same bit of words 32 apart (rotations line up).
        let w = next(n / 4 - 32);
        let bit = next(32);
        b[4 * w + bit / 8] ^= 1 << (bit % 8);
        b[4 * (w + 32) + bit / 8] ^= 1 << (bit % 8);
        check(&mut b, "two bits 32 words apart");
        for _ in 0..3 {
            let k = next(n * 8);
            b[k / 8] ^= 1 << (k % 8);
        }
        check(&mut b, "three bits");
        let start = next(n * 8 - 64);
        let len = 2 + next(63);
        for k in start..start + len {
            if next(2) == 1 || k == start || k == start + len - 1 {
                b[k / 8] ^= 1 << (k % 8);
            }
        }
        check(&mut b, "burst");
        let (p, q) = (next(n / 4), next(n / 4));
        if b[4 * p..4 * p + 4] != b[4 * q..4 * q + 4] {
            for k in 0..4 {
                b.swap(4 * p + k, 4 * q + k);
            }
            check(&mut b, "word swap");
        }
        let at = next(n - 256);
        let fill = if next(2) == 1 { 0xFF } else { 0 };
        let len = 16 * (1 + next(16));
        if b[at..at + len].iter().any(|&x| x != fill) {
            b[at..at + len].fill(fill);
            check(&mut b, "erased block");
        }
    }
}
