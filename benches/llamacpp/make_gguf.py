"""Random Mixtral-style decoders as GGUF files for llama.cpp's llama-bench.

The shapes of `examples/decode_bench.rs`'s built-in models (vocabulary
32,000, untied head, 4 layers, 8 experts top-2 of inner width 3.5 x hidden,
8 query and 2 key/value heads, RoPE base 1e6): a speed comparison on equal
work, not on equal weights (the values are numpy's, not decode_bench's).

    PYTHONPATH=LLAMA_CPP/gguf-py python3 make_gguf.py OUT_DIR 512 1024

writes OUT_DIR/mixtral-{H}-{f32,f16,q8_0}.gguf.
"""

import sys

import numpy as np
import gguf

VOCAB, LAYERS, EXPERTS, TOP_K, HEADS, KV_HEADS = 32000, 4, 8, 2, 8, 2


def tensors(hidden, rng):
    inner, hd = hidden * 7 // 2, hidden // HEADS

    def w(*shape):
        return (rng.uniform(-1, 1, size=shape) / np.sqrt(shape[-1])).astype(np.float32)

    yield "token_embd.weight", w(VOCAB, hidden), False
    yield "output_norm.weight", np.ones(hidden, np.float32), True
    yield "output.weight", w(VOCAB, hidden), False
    for l in range(LAYERS):
        p = f"blk.{l}."
        yield p + "attn_norm.weight", np.ones(hidden, np.float32), True
        yield p + "attn_q.weight", w(HEADS * hd, hidden), False
        yield p + "attn_k.weight", w(KV_HEADS * hd, hidden), False
        yield p + "attn_v.weight", w(KV_HEADS * hd, hidden), False
        yield p + "attn_output.weight", w(hidden, HEADS * hd), False
        yield p + "ffn_norm.weight", np.ones(hidden, np.float32), True
        yield p + "ffn_gate_inp.weight", w(EXPERTS, hidden), True
        yield p + "ffn_gate_exps.weight", w(EXPERTS, inner, hidden), False
        yield p + "ffn_up_exps.weight", w(EXPERTS, inner, hidden), False
        yield p + "ffn_down_exps.weight", w(EXPERTS, hidden, inner), False


def write(path, hidden, kind):
    inner, hd = hidden * 7 // 2, hidden // HEADS
    out = gguf.GGUFWriter(path, "llama")
    out.add_name(f"random-mixtral-{hidden}")
    out.add_context_length(512)
    out.add_embedding_length(hidden)
    out.add_block_count(LAYERS)
    out.add_feed_forward_length(inner)
    out.add_rope_dimension_count(hd)
    out.add_head_count(HEADS)
    out.add_head_count_kv(KV_HEADS)
    out.add_layer_norm_rms_eps(1e-5)
    out.add_rope_freq_base(1e6)
    out.add_expert_count(EXPERTS)
    out.add_expert_used_count(TOP_K)
    # A placeholder vocabulary (llama-bench feeds token ids, never text).
    out.add_tokenizer_model("llama")
    out.add_token_list([f"<t{i}>".encode() for i in range(VOCAB)])
    out.add_token_scores([0.0] * VOCAB)
    out.add_token_types([1] * VOCAB)
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    rng = np.random.default_rng(hidden)
    for name, t, keep_f32 in tensors(hidden, rng):
        if keep_f32 or kind == "f32":
            out.add_tensor(name, t)
        elif kind == "f16":
            out.add_tensor(name, t.astype(np.float16))
        else:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            out.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


if __name__ == "__main__":
    out_dir, widths = sys.argv[1], [int(a) for a in sys.argv[2:]] or [512, 1024]
    for h in widths:
        for kind in ["f32", "f16", "q8_0"]:
            path = f"{out_dir}/mixtral-{h}-{kind}.gguf"
            write(path, h, kind)
            print(path)
