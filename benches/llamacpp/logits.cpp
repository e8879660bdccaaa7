// Logits of a GGUF model at every position of one batch, from llama.cpp's
// C API (include/llama.h), for compare_int8.py (outside CI).
//
//     mm-logits MODEL.gguf 1,15,27,300 [THREADS [KV]] > out.json
//
// prints {"logits": [[n_vocab floats] per position], "experts": [[[ids] per
// position] per MoE layer]} (the experts each layer's router chose, read from
// the graph's "ffn_moe_topk-L" nodes through the eval callback, as
// `micromoe eval --json` prints them); THREADS defaults to 1,
// KV (the K and V cache type) to f16, llama.cpp's default; "f32" for f32.
//
// Build against a llama.cpp tree whose `llama` target is built (shared
// libraries, the default on Linux):
//
//     SRC=/tmp/llamacpp; B=$SRC/build
//     cmake --build $B -j2 --target llama
//     g++ -O2 -std=c++17 benches/llamacpp/logits.cpp -I$SRC/include -I$SRC/ggml/include \
//         -L$B/bin -lllama -lggml -lggml-base -Wl,-rpath,$B/bin -o $B/bin/mm-logits
//
// Context 512; the whole list (at most 512 ids) is decoded by a single llama_decode with
// an output requested at every position, as transformers' forward does.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ggml.h"

// experts[layer][position] = the chosen expert ids, best first.
using Experts = std::vector<std::vector<std::vector<int>>>;

static bool watch(struct ggml_tensor * t, bool ask, void * user) {
    const char * prefix = "ffn_moe_topk-";
    if (strncmp(t->name, prefix, strlen(prefix)) != 0) return !ask;  // ask: not wanted; else go on
    if (ask) return true;
    // An I32 view [n_expert_used, n_tokens] of the argsort, host memory (CPU backend).
    auto & experts = *(Experts *) user;
    const size_t layer = (size_t) atoi(t->name + strlen(prefix));
    if (experts.size() <= layer) experts.resize(layer + 1);
    experts[layer].assign(t->ne[1], std::vector<int>(t->ne[0]));
    for (int64_t i = 0; i < t->ne[1]; i++)
        for (int64_t k = 0; k < t->ne[0]; k++)
            experts[layer][i][k] = *(const int32_t *) ((const char *) t->data + i * t->nb[1] + k * t->nb[0]);
    return true;
}

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf ID,ID,... [THREADS [f16|f32]]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    for (const char * p = argv[2]; *p;) {
        char * end;
        ids.push_back((llama_token) strtol(p, &end, 10));
        if (end == p) { fprintf(stderr, "bad token list: %s\n", argv[2]); return 2; }
        p = *end == ',' ? end + 1 : end;
    }
    const int threads = argc > 3 ? atoi(argv[3]) : 1;
    const bool kv_f32 = argc > 4 && strcmp(argv[4], "f32") == 0;
    if (argc > 4 && !kv_f32 && strcmp(argv[4], "f16") != 0) { fprintf(stderr, "KV: f16 or f32\n"); return 2; }

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = cp.n_ubatch = 512;  // the whole list in one physical batch
    cp.n_threads = cp.n_threads_batch = threads;
    if (kv_f32) cp.type_k = cp.type_v = GGML_TYPE_F32;
    Experts experts;
    cp.cb_eval = watch;
    cp.cb_eval_user_data = &experts;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }

    const int n = (int) ids.size();
    if (n > 512) { fprintf(stderr, "at most 512 ids\n"); return 2; }
    llama_batch batch = llama_batch_init(n, 0, 1);
    batch.n_tokens = n;
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;  // an output row at every position
    }
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }

    std::string out = "{\"logits\": [";
    char buf[32];
    for (int i = 0; i < n; i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        out += i ? ", [" : "[";
        for (int v = 0; v < n_vocab; v++) {
            snprintf(buf, sizeof buf, v ? ",%.9g" : "%.9g", row[v]);
            out += buf;
        }
        out += "]";
    }
    out += "], \"experts\": [";
    for (size_t l = 0; l < experts.size(); l++) {
        out += l ? ", [" : "[";
        for (size_t i = 0; i < experts[l].size(); i++) {
            out += i ? ", [" : "[";
            for (size_t k = 0; k < experts[l][i].size(); k++)
                out += (k ? "," : "") + std::to_string(experts[l][i][k]);
            out += "]";
        }
        out += "]";
    }
    out += "]}\n";
    fputs(out.c_str(), stdout);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
