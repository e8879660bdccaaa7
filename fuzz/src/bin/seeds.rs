//! Seed corpora for the fuzz targets, and the stable stand-in for fuzzing.
//!
//! `cargo run --release --bin seeds -- write` writes `corpus/<target>/`
//! from the committed models and from small synthetic checkpoints that
//! cover every layer mix (float gate over Q15 experts, f16 gate over f32
//! experts, integer sigmoid routing, integer shared-expert gates, Qwen2-MoE
//! dense layers, ...), converted by the crate's own converter.
//!
//! `cargo run --release --bin seeds -- check [N]` runs every seed, and N
//! random mutations of each (bit flips, byte edits, truncations; the checksum
//! is repaired by the targets), through the targets' bodies: no coverage
//! guidance, but it runs on stable Rust and CI runs it.

use std::path::{Path, PathBuf};

use micromoe::host::{Checkpoint, DecoderOptions, Dtype, convert_checkpoint, convert_decoder_checkpoint};
use safetensors::{Dtype as St, tensor::TensorView};
use serde_json::{Value, json};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn value(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Named f32 tensors, serialized as safetensors.
struct Tensors {
    list: Vec<(String, Vec<usize>, Vec<u8>)>,
    rng: Rng,
}

impl Tensors {
    fn new(seed: u64) -> Self {
        Tensors { list: Vec::new(), rng: Rng(seed) }
    }
    fn put(&mut self, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let bytes = (0..n).flat_map(|_| self.rng.value().to_le_bytes()).collect();
        self.list.push((name.to_string(), shape.to_vec(), bytes));
    }
    fn ones(&mut self, name: &str, n: usize) {
        let bytes = (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect();
        self.list.push((name.to_string(), vec![n], bytes));
    }
    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = self
            .list
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(St::F32, s.clone(), b).expect("view")))
            .collect();
        safetensors::serialize(views, None).expect("serialize")
    }
}

/// The checkpoint target's input: `[config length u16][config][safetensors]`.
fn packed(config: &Value, t: &Tensors) -> Vec<u8> {
    let c = serde_json::to_vec(config).expect("json");
    let mut out = (c.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&c);
    out.extend_from_slice(&t.bytes());
    out
}

/// A stack layer's config and tensors (`our naming scheme`, host docs).
fn stack_layer(t: &mut Tensors, l: usize, spec: &Value) {
    let g = |k: &str| spec[k].as_u64().unwrap_or(0) as usize;
    let (inp, out, hidden, experts) = (g("in_dim"), g("out_dim"), g("hidden"), g("experts"));
    let (gated, bias) = (spec["gated"].as_bool() == Some(true), spec["bias"].as_bool() == Some(true));
    let p = format!("layers.{l}");
    t.put(&format!("{p}.gate.weight"), &[experts, inp]);
    if spec["router"] == "deepseek_v3" {
        t.put(&format!("{p}.gate.e_score_correction_bias"), &[experts]);
    }
    let expert = |t: &mut Tensors, name: &str, h: usize| {
        for (part, rows, cols) in [("up", h, inp), ("down", out, h)] {
            t.put(&format!("{name}.{part}.weight"), &[rows, cols]);
            if bias {
                t.put(&format!("{name}.{part}.bias"), &[rows]);
            }
        }
        if gated {
            t.put(&format!("{name}.gate_proj.weight"), &[h, inp]);
            if bias {
                t.put(&format!("{name}.gate_proj.bias"), &[h]);
            }
        }
    };
    for e in 0..experts {
        expert(t, &format!("{p}.experts.{e}"), hidden);
    }
    if g("shared_hidden") > 0 {
        expert(t, &format!("{p}.shared_expert"), g("shared_hidden"));
        if spec["shared_gate"].as_bool() == Some(true) {
            t.put(&format!("{p}.shared_expert_gate.weight"), &[1, inp]);
        }
    }
}

fn stacks() -> Vec<(Value, Tensors)> {
    let layer = |inp: usize, out: usize, router: &str, extra: Value| {
        let mut v = json!({
            "in_dim": inp, "out_dim": out, "hidden": 6, "experts": 4, "k": 2,
            "router": router, "activation": "silu", "gated": true, "bias": false
        });
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        v
    };
    let configs = [
        vec![
            layer(8, 6, "mixtral", json!({})),
            layer(6, 3, "switch", json!({"k": 1, "activation": "relu", "gated": false, "bias": true})),
        ],
        vec![layer(
            8,
            4,
            "qwen2_moe",
            json!({"shared_hidden": 5, "shared_gate": true, "norm_topk_prob": true}),
        )],
        vec![layer(
            8,
            4,
            "deepseek_v3",
            json!({"experts": 8, "k": 3, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "shared_hidden": 4}),
        )],
        vec![layer(8, 4, "qwen2_moe", json!({"activation": "gelu", "gated": false, "bias": true, "k": 1}))],
    ];
    configs
        .into_iter()
        .enumerate()
        .map(|(i, layers)| {
            let mut t = Tensors::new(i as u64 + 1);
            for (l, spec) in layers.iter().enumerate() {
                stack_layer(&mut t, l, spec);
            }
            let task = if i % 2 == 0 { "classify" } else { "regress" };
            (json!({"architecture": "moe_mlp", "task": task, "input_dim": 8, "layers": layers}), t)
        })
        .collect()
}

/// Tiny Hugging Face-style decoders: Mixtral (tied and untied), Qwen2-MoE
/// with a shared expert, qkv biases and a dense layer.
fn decoders() -> Vec<(Value, Tensors)> {
    let (vocab, hidden, heads, kv, inter) = (16usize, 8usize, 2usize, 1usize, 6usize);
    let hd = hidden / heads;
    let mut out = Vec::new();
    for (i, qwen) in [false, true, false].into_iter().enumerate() {
        let tied = i == 2;
        let layers = 2;
        let mut t = Tensors::new(100 + i as u64);
        t.put("model.embed_tokens.weight", &[vocab, hidden]);
        if !tied {
            t.put("lm_head.weight", &[vocab, hidden]);
        }
        t.ones("model.norm.weight", hidden);
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            for (n, rows, cols) in [
                ("q", heads * hd, hidden),
                ("k", kv * hd, hidden),
                ("v", kv * hd, hidden),
                ("o", hidden, heads * hd),
            ] {
                t.put(&format!("{p}.self_attn.{n}_proj.weight"), &[rows, cols]);
                if qwen && n != "o" {
                    t.put(&format!("{p}.self_attn.{n}_proj.bias"), &[rows]);
                }
            }
            t.ones(&format!("{p}.input_layernorm.weight"), hidden);
            t.ones(&format!("{p}.post_attention_layernorm.weight"), hidden);
            let swiglu = |t: &mut Tensors, prefix: &str, names: [&str; 3], h: usize| {
                t.put(&format!("{prefix}.{}.weight", names[0]), &[h, hidden]);
                t.put(&format!("{prefix}.{}.weight", names[1]), &[h, hidden]);
                t.put(&format!("{prefix}.{}.weight", names[2]), &[hidden, h]);
            };
            if qwen {
                let m = format!("{p}.mlp");
                if l == 1 {
                    swiglu(&mut t, &m, ["gate_proj", "up_proj", "down_proj"], inter);
                    continue;
                }
                t.put(&format!("{m}.gate.weight"), &[4, hidden]);
                for e in 0..4 {
                    swiglu(&mut t, &format!("{m}.experts.{e}"), ["gate_proj", "up_proj", "down_proj"], inter);
                }
                swiglu(&mut t, &format!("{m}.shared_expert"), ["gate_proj", "up_proj", "down_proj"], inter);
                t.put(&format!("{m}.shared_expert_gate.weight"), &[1, hidden]);
            } else {
                let m = format!("{p}.block_sparse_moe");
                t.put(&format!("{m}.gate.weight"), &[4, hidden]);
                for e in 0..4 {
                    swiglu(&mut t, &format!("{m}.experts.{e}"), ["w1", "w3", "w2"], inter);
                }
            }
        }
        let mut config = json!({
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 8,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied,
            "num_experts_per_tok": 2, "hidden_act": "silu"
        });
        if qwen {
            config["architectures"] = json!(["Qwen2MoeForCausalLM"]);
            config["num_experts"] = json!(4);
            config["moe_intermediate_size"] = json!(inter);
            config["shared_expert_intermediate_size"] = json!(inter);
            config["intermediate_size"] = json!(inter);
            config["mlp_only_layers"] = json!([1]);
            config["norm_topk_prob"] = json!(true);
        } else {
            config["architectures"] = json!(["MixtralForCausalLM"]);
            config["num_local_experts"] = json!(4);
            config["intermediate_size"] = json!(inter);
        }
        out.push((config, t));
    }
    out
}

fn write(root: &Path) {
    let repo = root.join("..");
    let dir = |t: &str| {
        let d = root.join("corpus").join(t);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    };
    let (stack_dir, dec_dir, ck_dir) = (dir("parse_infer"), dir("decoder"), dir("checkpoint"));
    let save = |d: &PathBuf, name: &str, bytes: &[u8]| std::fs::write(d.join(name), bytes).expect("write");
    for m in ["digits_f32", "digits_f16", "digits_int8", "digits_q15"] {
        let bytes = std::fs::read(repo.join(format!("models/digits/{m}.moe"))).expect("model");
        save(&stack_dir, &format!("{m}.moe"), &bytes);
    }
    let mmoe = repo.join("tests/fixtures/mmoe");
    let ck = Checkpoint::open(&mmoe).expect("mmoe fixture");
    let mixes = [
        ("f32", Dtype::F32, None),
        ("f16", Dtype::F16, None),
        ("f32_over_f16", Dtype::F16, Some(Dtype::F32)),
        ("f16_over_f32", Dtype::F32, Some(Dtype::F16)),
        ("int8", Dtype::Int8, None),
        ("q15", Dtype::Q15, None),
        ("f32_over_q15", Dtype::Q15, Some(Dtype::F32)),
        ("f16_over_int8", Dtype::Int8, Some(Dtype::F16)),
    ];
    let mut n = 0;
    let mut convert = |name: &str, ck: &Checkpoint, width: usize| {
        let cal: Vec<f32> = {
            let mut r = Rng(7);
            (0..16 * width).map(|_| 2.0 * r.value()).collect()
        };
        for (tag, d, g) in mixes {
            let c = matches!(d, Dtype::Int8 | Dtype::Q15).then_some(&cal[..]);
            let bytes =
                convert_checkpoint(ck, d, g, c, |_, _| {}).unwrap_or_else(|e| panic!("{name} {tag}: {e}"));
            save(&stack_dir, &format!("{name}_{tag}.moe"), &bytes);
            n += 1;
        }
    };
    convert("mmoe", &ck, 16);
    for (i, (config, t)) in stacks().iter().enumerate() {
        let ck = Checkpoint::from_bytes(&serde_json::to_vec(config).unwrap(), &[&t.bytes()]).expect("stack");
        convert(&format!("stack{i}"), &ck, 8);
        save(&ck_dir, &format!("stack{i}.bin"), &packed(config, t));
    }
    let tiny = std::fs::read(repo.join("models/tinylm/tinylm_int8.moe")).expect("tinylm");
    save(&dec_dir, "tinylm_int8.bin", &[&[0u8][..], &tiny].concat());
    for (i, (config, t)) in decoders().iter().enumerate() {
        let ck =
            Checkpoint::from_bytes(&serde_json::to_vec(config).unwrap(), &[&t.bytes()]).expect("decoder");
        for (tag, d, kv) in
            [("f32", Dtype::F32, false), ("f16_kv16", Dtype::F16, true), ("int8", Dtype::Int8, true)]
        {
            let opts = DecoderOptions { kv_f16: kv, ..DecoderOptions::new(d) };
            let bytes = convert_decoder_checkpoint(&ck, &opts).unwrap_or_else(|e| panic!("decoder{i}: {e}"));
            save(&dec_dir, &format!("decoder{i}_{tag}.bin"), &[&[i as u8][..], &bytes].concat());
        }
        save(&ck_dir, &format!("decoder{i}.bin"), &packed(config, t));
    }
    let count = |d: &PathBuf| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    println!(
        "seeds: parse_infer {} ({n} converted), decoder {}, checkpoint {}",
        count(&stack_dir),
        count(&dec_dir),
        count(&ck_dir)
    );
}

/// Every seed and `mutations` random edits of each through its target.
fn check(root: &Path, mutations: usize) {
    type Target = (&'static str, fn(&[u8]));
    let targets: [Target; 3] = [
        ("parse_infer", micromoe_fuzz::stack),
        ("decoder", micromoe_fuzz::decoder),
        ("checkpoint", micromoe_fuzz::checkpoint),
    ];
    let mut rng = Rng(0x5EED);
    for (name, run) in targets {
        let dir = root.join("corpus").join(name);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("corpus: run `seeds write` first")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        seeds.sort();
        let start = std::time::Instant::now();
        let mut runs = 0;
        for path in &seeds {
            let seed = std::fs::read(path).expect("seed");
            run(&seed);
            runs += 1;
            for _ in 0..mutations {
                let mut m = seed.clone();
                match rng.next() % 4 {
                    0 => {
                        let cut = (rng.next() as usize) % (m.len() + 1);
                        m.truncate(cut);
                    }
                    _ => {
                        for _ in 0..1 + rng.next() % 4 {
                            if m.is_empty() {
                                break;
                            }
                            let i = (rng.next() as usize) % m.len();
                            m[i] = match rng.next() % 3 {
                                0 => m[i] ^ (1 << (rng.next() % 8)),
                                1 => rng.next() as u8,
                                _ => [0, 1, 0x7F, 0x80, 0xFF][(rng.next() % 5) as usize],
                            };
                        }
                    }
                }
                run(&m);
                runs += 1;
            }
        }
        println!(
            "{name}: {} seeds, {runs} runs, no panic ({:.1} s)",
            seeds.len(),
            start.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") => write(&root),
        Some("check") => check(&root, args.get(1).and_then(|n| n.parse().ok()).unwrap_or(200)),
        _ => {
            eprintln!("usage: seeds write | seeds check [mutations per seed]");
            std::process::exit(2);
        }
    }
}
