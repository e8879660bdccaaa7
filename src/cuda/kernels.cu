// micromoe's CUDA kernels, compiled at run time by NVRTC (one program per
// weight type: WTYPE is float or unsigned short holding f16 bits), and by the
// host C++ compiler for the CPU emulator (src/cuda/emu.cpp), which runs them
// thread by thread with real barriers so CI tests them without a GPU.
//
// Every output value is computed by one thread in an order fixed by the
// shapes alone, so results do not depend on the batch or the launch shape.
// The gate follows the CPU kernel's dot order (eight lanes, fixed tree, no
// fused multiply-add) so router logits, and so the chosen experts, are the
// CPU's bit for bit. The expert GEMMs sum each output in input order with
// fused multiply-adds.

#if defined(MICROMOE_CLANG_CHECK)
// A syntax check with clang and no CUDA headers.
#include "__clang_cuda_builtin_vars.h"
#define FMUL(a, b) ((a) * (b))
#define FADD(a, b) ((a) + (b))
#define FMA(a, b, c) __builtin_fmaf(a, b, c)
#define FDIV(a, b) ((a) / (b))
#define FSQRT(x) __builtin_sqrtf(x)
// No libdevice in a header-less check: stand-ins keep the code compiling.
#define EXPF(x) (x)
#define ERFF(x) (x)
#define TANHF(x) (x)
#define AS_FLOAT(i) __builtin_bit_cast(float, i)
#define AS_BITS(f) __builtin_bit_cast(unsigned int, f)
#define KERNEL extern "C" __attribute__((global))
#define DEVICE __attribute__((device))
#define SHARED __attribute__((shared))
#define SYNC() __syncthreads()
#elif defined(MICROMOE_EMULATOR)
// Defined by emu.cpp, which includes this file.
#else
#define FMUL(a, b) __fmul_rn(a, b)
#define FADD(a, b) __fadd_rn(a, b)
#define FMA(a, b, c) __fmaf_rn(a, b, c)
#define FDIV(a, b) __fdiv_rn(a, b)
#define FSQRT(x) __fsqrt_rn(x)
#define EXPF(x) expf(x)
#define ERFF(x) erff(x)
#define TANHF(x) tanhf(x)
#define AS_FLOAT(i) __int_as_float(i)
#define AS_BITS(f) __float_as_uint(f)
#define KERNEL extern "C" __global__
#define DEVICE __device__
#define SHARED __shared__
#define SYNC() __syncthreads()
#endif

#ifndef WTYPE
#define WTYPE float
#endif

DEVICE inline float load_w(const float* w, long i) { return w[i]; }

// IEEE half bits to float, exactly.
DEVICE inline float load_w(const unsigned short* w, long i) {
    unsigned int h = w[i];
    unsigned int sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    unsigned int bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        int e = -1;
        do { man <<= 1; e++; } while ((man & 0x400) == 0);
        bits = sign | ((unsigned int)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    return AS_FLOAT((int)bits);
}

// micromoe's dot order: lane i % 8, lanes added ((0+4)+(2+6))+((1+5)+(3+7)),
// then the tail, multiplies and adds never fused (the CPU's `kernels::dot`,
// each weight widened exactly first).
template <class W>
DEVICE float dot(const W* w, long w0, const float* x, int n) {
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int blocks = n / 8;
    for (int b = 0; b < blocks; b++) {
        for (int i = 0; i < 8; i++) {
            l[i] = FADD(l[i], FMUL(load_w(w, w0 + b * 8 + i), x[b * 8 + i]));
        }
    }
    float s = FADD(FADD(FADD(l[0], l[4]), FADD(l[2], l[6])), FADD(FADD(l[1], l[5]), FADD(l[3], l[7])));
    for (int i = blocks * 8; i < n; i++) {
        s = FADD(s, FMUL(load_w(w, w0 + i), x[i]));
    }
    return s;
}

#define GLOBAL_ID() ((long)blockIdx.x * blockDim.x + threadIdx.x)

// logits[t, e] = gate[e] . x[t]. The gate is always f32 on the device (an f16
// gate widened exactly), as the CPU widens each f16 weight before its product.
KERNEL void gate_logits(const float* gate, const float* x, float* logits, int tokens, int experts, int d) {
    long id = GLOBAL_ID();
    if (id >= (long)tokens * experts) return;
    int t = id / experts, e = id % experts;
    logits[id] = dot(gate, (long)e * d, x + (long)t * d, d);
}

// The CPU's expert non-linearities (`Activation`) by code: 0 ReLU, 1 GELU
// (erf), 2 GELU (tanh), 3 SiLU; anything else, none. The same formulas,
// operation for operation; erff, tanhf and expf may differ in the last bits.
DEVICE float activate(float x, int act) {
    switch (act) {
    case 0:
        return x > 0.0f ? x : 0.0f;
    case 1:
        return FMUL(FMUL(0.5f, x), FADD(1.0f, ERFF(FMUL(x, 0.70710678f))));
    case 2: {
        float inner = FMUL(0.7978846f, FADD(x, FMUL(FMUL(FMUL(0.044715f, x), x), x)));
        return FMUL(FMUL(0.5f, x), FADD(1.0f, TANHF(inner)));
    }
    case 3:
        return FDIV(x, FADD(1.0f, EXPF(-x)));
    default:
        return x;
    }
}

// The grouped expert GEMM. The plan lists entries (token, expert) grouped by
// expert; the host cuts each expert's group into tiles of up to TILE_M
// entries: tiles[3 i .. 3 i + 3] = (expert, first entry, entries). Block
// (i, j) computes those entries x outputs j TILE_N .. j TILE_N + TILE_N of
// that expert: rows[r] = in[row r] . w[e][n], over K inputs in slices of
// TILE_K staged in shared memory (gathered through `gather` when given, so
// the tokens are read straight from the batch). 256 threads, each 4 x 4
// outputs at rows ty + 16 a and columns tx + 16 b (conflict-free reads).
// Each sum gets its expert's bias (when `has_bias`), then: with DUAL the
// block also computes w3's products and stores the gated unit
// act(w1 . x + b1) * (w3 . x + b3); without, act(w . x + b).
#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define TILE_THREADS 256

template <bool DUAL>
DEVICE void grouped_gemm(const WTYPE* w, const WTYPE* w3, const float* in, const int* gather, const int* tiles,
                         float* out, int n_out, int k_in, const float* bias, const float* bias3, int has_bias,
                         int act) {
    SHARED float xs[TILE_K][TILE_M];
    SHARED float ws[TILE_K][TILE_N];
    SHARED float vs[DUAL ? TILE_K : 1][DUAL ? TILE_N : 1];
    const int expert = tiles[3 * blockIdx.x], first = tiles[3 * blockIdx.x + 1], count = tiles[3 * blockIdx.x + 2];
    const int n0 = blockIdx.y * TILE_N;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const long wbase = (long)expert * n_out * k_in;
    float acc[4][4], acc3[4][4];
    for (int a = 0; a < 4; a++) {
        for (int b = 0; b < 4; b++) {
            acc[a][b] = 0.0f;
            acc3[a][b] = 0.0f;
        }
    }
    for (int k0 = 0; k0 < k_in; k0 += TILE_K) {
        // Stage TILE_M x TILE_K inputs and TILE_N x TILE_K weights, k-major,
        // zeros past the edges (they add exact zeros: the sums do not change).
        for (int i = tid; i < TILE_M * TILE_K; i += TILE_THREADS) {
            int r = i / TILE_K, c = i % TILE_K, k = k0 + c;
            float v = 0.0f;
            if (r < count && k < k_in) {
                long row = gather ? gather[first + r] : first + r;
                v = in[row * k_in + k];
            }
            xs[c][r] = v;
        }
        for (int i = tid; i < TILE_N * TILE_K; i += TILE_THREADS) {
            int r = i / TILE_K, c = i % TILE_K, k = k0 + c, n = n0 + r;
            bool inside = n < n_out && k < k_in;
            ws[c][r] = inside ? load_w(w, wbase + (long)n * k_in + k) : 0.0f;
            if (DUAL) vs[c][r] = inside ? load_w(w3, wbase + (long)n * k_in + k) : 0.0f;
        }
        SYNC();
        for (int c = 0; c < TILE_K; c++) {
            float xv[4], wv[4];
            for (int a = 0; a < 4; a++) xv[a] = xs[c][ty + 16 * a];
            for (int b = 0; b < 4; b++) wv[b] = ws[c][tx + 16 * b];
            for (int a = 0; a < 4; a++) {
                for (int b = 0; b < 4; b++) acc[a][b] = FMA(xv[a], wv[b], acc[a][b]);
            }
            if (DUAL) {
                for (int b = 0; b < 4; b++) wv[b] = vs[c][tx + 16 * b];
                for (int a = 0; a < 4; a++) {
                    for (int b = 0; b < 4; b++) acc3[a][b] = FMA(xv[a], wv[b], acc3[a][b]);
                }
            }
        }
        SYNC();
    }
    for (int a = 0; a < 4; a++) {
        int r = ty + 16 * a;
        if (r >= count) continue;
        for (int b = 0; b < 4; b++) {
            int n = n0 + tx + 16 * b;
            if (n >= n_out) continue;
            long at = (long)expert * n_out + n;
            float g = has_bias ? FADD(acc[a][b], bias[at]) : acc[a][b];
            float u = has_bias && DUAL ? FADD(acc3[a][b], bias3[at]) : acc3[a][b];
            out[(long)(first + r) * n_out + n] = DUAL ? FMUL(activate(g, act), u) : activate(g, act);
        }
    }
}

// h[n, j] = act(w1[e][j] . x[t] + b1) * (w3[e][j] . x[t] + b3) for plan entry
// n = (t, e) of a gated expert, act(w1[e][j] . x[t] + b1) of an MLP's (`gated` 0).
KERNEL void expert_hidden(const WTYPE* w1, const WTYPE* w3, const float* x, const int* entry_token,
                          const int* tiles, float* h, int hidden, int d, const float* b1, const float* b3,
                          int has_bias, int act, int gated) {
    if (gated) {
        grouped_gemm<true>(w1, w3, x, entry_token, tiles, h, hidden, d, b1, b3, has_bias, act);
    } else {
        grouped_gemm<false>(w1, w1, x, entry_token, tiles, h, hidden, d, b1, b1, has_bias, act);
    }
}

// y[n, i] = w2[e][i] . h[n] + b2[e][i]
KERNEL void expert_out(const WTYPE* w2, const float* h, const int* tiles, float* y, int d, int hidden,
                       const float* b2, int has_bias) {
    grouped_gemm<false>(w2, w2, h, nullptr, tiles, y, d, hidden, b2, b2, has_bias, -1);
}

// out[t, i] = sum over the token's slots, in router order, of weight * y[entry].
KERNEL void combine(const float* y, const int* slot_entry, const float* slot_weight, float* out, int tokens, int k,
                    int d) {
    long id = GLOBAL_ID();
    if (id >= (long)tokens * d) return;
    int t = id / d, i = id % d;
    float s = 0.0f;
    for (int slot = 0; slot < k; slot++) {
        int n = slot_entry[t * k + slot];
        if (n >= 0) s = FADD(s, FMUL(slot_weight[t * k + slot], y[(long)n * d + i]));
    }
    out[id] = s;
}

// out[t, i] += scale[t] * sy[t, i]: the shared expert, after the routed ones.
KERNEL void add_shared(const float* sy, const float* scale, float* out, int tokens, int d) {
    long id = GLOBAL_ID();
    if (id >= (long)tokens * d) return;
    out[id] = FADD(out[id], FMUL(scale[id / d], sy[id]));
}

// ---- Whole decoders (src/cuda/decoder.rs). A batch is `rows` tokens, each
// with its sequence's KV-cache slot and its position; every kernel below
// computes each output in the CPU decoder's order (src/model/decoder.rs), so
// that only the expert GEMMs' fused multiply-adds and expf differ from it.

// out[r, i] = e[tokens[r], i]: the embedding rows, widened exactly.
KERNEL void embed(const WTYPE* e, const int* tokens, float* out, int rows, int h) {
    long id = GLOBAL_ID();
    if (id >= (long)rows * h) return;
    out[id] = load_w(e, (long)tokens[id / h] * h + id % h);
}

// out[r] = x[rows[r]] for `n` rows of width h.
KERNEL void gather_rows(const float* x, const int* rows, float* out, int n, int h) {
    long id = GLOBAL_ID();
    if (id >= (long)n * h) return;
    out[id] = x[(long)rows[id / h] * h + id % h];
}

// scale[r] = 1 / sqrt(mean(x[r]^2) + eps), the sum in element order, as
// the CPU's `rms_norm`. A mean square that is not finite gives NaN (the CPU
// refuses it; here the logits' check does).
KERNEL void rms_scale(const float* x, float* scale, int rows, int h, int eps_bits) {
    long r = GLOBAL_ID();
    if (r >= rows) return;
    float s = AS_FLOAT((int)0x80000000);
    for (int i = 0; i < h; i++) s = FADD(s, FMUL(x[r * h + i], x[r * h + i]));
    float ms = FDIV(s, (float)h);
    float v = FDIV(1.0f, FSQRT(FADD(ms, AS_FLOAT(eps_bits))));
    scale[r] = FADD(ms, -ms) == 0.0f ? v : AS_FLOAT(0x7fc00000);
}

// out[r, i] = g[i] * (x[r, i] * scale[r]).
KERNEL void rms_apply(const float* x, const float* scale, const float* g, float* out, int rows, int h) {
    long id = GLOBAL_ID();
    if (id >= (long)rows * h) return;
    out[id] = FMUL(g[id % h], FMUL(x[id], scale[id / h]));
}

// out[t, r] = w[r] . x[t] (+ bias[r]): the CPU's matrix-vector product, bit for bit.
KERNEL void linear(const WTYPE* w, const float* bias, const float* x, float* out, int tokens, int rows,
                   int cols, int has_bias) {
    long id = GLOBAL_ID();
    if (id >= (long)tokens * rows) return;
    int t = id / rows, r = id % rows;
    float s = dot(w, (long)r * cols, x + (long)t * cols, cols);
    out[id] = has_bias ? FADD(s, bias[r]) : s;
}

// Rotates every head of v (rows x width, heads of hd): pairs (i, i + hd/2)
// by the row's angles cos/sin (rows x hd/2, made on the host as the CPU makes them).
KERNEL void rope(float* v, const float* cos, const float* sin, int rows, int width, int hd) {
    const int half = hd / 2, pairs = width / 2;
    long id = GLOBAL_ID();
    if (id >= (long)rows * pairs) return;
    int r = id / pairs, j = id % pairs, head = j / half, i = j % half;
    long a = (long)r * width + head * hd + i, b = a + half;
    float c = cos[(long)r * half + i], s = sin[(long)r * half + i];
    float v1 = v[a], v2 = v[b];
    v[a] = FADD(FMUL(v1, c), -FMUL(v2, s));
    v[b] = FADD(FMUL(v2, c), FMUL(v1, s));
}

// f32 to the nearest f16 value (ties to even), as a float: an f16 cache.
DEVICE float round_f16(float v) {
    unsigned int b = AS_BITS(v), sign = b & 0x80000000u, a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) return v;                              // infinity, NaN
    if (a >= 0x477ff000u) return AS_FLOAT((int)(sign | 0x7f800000u));  // rounds past 65504
    if (a >= 0x38800000u) {                                      // a normal f16: 10 mantissa bits
        unsigned int rem = a & 0x1fffu, base = a & ~0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (base & 0x2000u))) base += 0x2000u;
        return AS_FLOAT((int)(sign | base));
    }
    if (a < 0x33000000u) return AS_FLOAT((int)sign);             // below half the least subnormal
    // A subnormal f16: a multiple of 2^-24.
    unsigned int m = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)(a >> 23);                            // 14 ..= 24
    unsigned int q = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) q += 1;
    float f = FMUL((float)q, AS_FLOAT(0x33800000));               // q * 2^-24, exact
    return sign ? -f : f;
}

// The cache holds, per slot, `layers` planes of keys then `layers` planes of
// values, each (context, kvd).
DEVICE inline long plane(int slot, int which, int layer, int layers, int context, int kvd) {
    return (((long)slot * 2 + which) * layers + layer) * context * kvd;
}

// Stores each row's keys and values at its position (rounded to f16 when
// `f16`, as the CPU's f16 cache stores them).
KERNEL void kv_store(const float* k, const float* v, float* cache, const int* slot, const int* pos, int rows,
                     int layer, int layers, int context, int kvd, int f16) {
    long id = GLOBAL_ID();
    if (id >= (long)rows * kvd) return;
    int r = id / kvd, i = id % kvd;
    long at = (long)pos[r] * kvd + i;
    float kv = k[id], vv = v[id];
    cache[plane(slot[r], 0, layer, layers, context, kvd) + at] = f16 ? round_f16(kv) : kv;
    cache[plane(slot[r], 1, layer, layers, context, kvd) + at] = f16 ? round_f16(vv) : vv;
}

// scores[r, head, t] = (q[r, head] . k[t]) * scale for t <= pos[r], the
// products added in element order from -0 (the CPU's `dot_seq`).
KERNEL void attn_scores(const float* q, const float* cache, float* scores, const int* slot, const int* pos,
                        int rows, int heads, int group, int hd, int layer, int layers, int context, int kvd,
                        int scale_bits) {
    long id = GLOBAL_ID();
    if (id >= (long)rows * heads * context) return;
    int t = id % context, head = id / context % heads, r = id / ((long)context * heads);
    if (t > pos[r]) return;
    const float* qh = q + ((long)r * heads + head) * hd;
    const float* kt = cache + plane(slot[r], 0, layer, layers, context, kvd) + (long)t * kvd + head / group * hd;
    float s = AS_FLOAT((int)0x80000000);
    for (int i = 0; i < hd; i++) s = FADD(s, FMUL(qh[i], kt[i]));
    scores[id] = FMUL(s, AS_FLOAT(scale_bits));
}

// Softmax of each (row, head)'s scores 0 ..= pos[r] in place, the CPU's: a
// maximum that is not finite leaves them as they are.
KERNEL void attn_softmax(float* scores, const int* pos, int rows, int heads, int context) {
    long id = GLOBAL_ID();
    if (id >= (long)rows * heads) return;
    float* s = scores + id * context;
    int n = pos[id / heads] + 1;
    float m = AS_FLOAT((int)0xff800000);
    for (int t = 0; t < n; t++) {
        if (s[t] > m) m = s[t];
    }
    if (FADD(m, -m) != 0.0f) return;
    float sum = 0.0f;
    for (int t = 0; t < n; t++) {
        s[t] = EXPF(FADD(s[t], -m));
        sum = FADD(sum, s[t]);
    }
    for (int t = 0; t < n; t++) s[t] = FDIV(s[t], sum);
}

// att[r, head, i] = sum over t <= pos[r], in order, of p[t] * v[t, i].
KERNEL void attn_out(const float* scores, const float* cache, float* att, const int* slot, const int* pos,
                     int rows, int heads, int group, int hd, int layer, int layers, int context, int kvd) {
    long id = GLOBAL_ID();
    if (id >= (long)rows * heads * hd) return;
    int i = id % hd, head = id / hd % heads, r = id / ((long)hd * heads);
    const float* p = scores + ((long)r * heads + head) * context;
    const float* vt = cache + plane(slot[r], 1, layer, layers, context, kvd) + head / group * hd + i;
    float o = 0.0f;
    for (int t = 0; t <= pos[r]; t++) o = FADD(o, FMUL(p[t], vt[(long)t * kvd]));
    att[id] = o;
}

// x += d (the residual).
KERNEL void add(float* x, const float* d, int n) {
    long id = GLOBAL_ID();
    if (id >= n) return;
    x[id] = FADD(x[id], d[id]);
}
