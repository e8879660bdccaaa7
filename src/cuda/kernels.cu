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
// No libdevice in a header-less check: a stand-in keeps the code compiling.
#define EXPF(x) (x)
#define AS_FLOAT(i) __builtin_bit_cast(float, i)
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
#define EXPF(x) expf(x)
#define AS_FLOAT(i) __int_as_float(i)
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
// then the tail, multiplies and adds never fused.
DEVICE float dot(const float* w, long w0, const float* x, int n) {
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int blocks = n / 8;
    for (int b = 0; b < blocks; b++) {
        for (int i = 0; i < 8; i++) {
            l[i] = FADD(l[i], FMUL(w[w0 + b * 8 + i], x[b * 8 + i]));
        }
    }
    float s = FADD(FADD(FADD(l[0], l[4]), FADD(l[2], l[6])), FADD(FADD(l[1], l[5]), FADD(l[3], l[7])));
    for (int i = blocks * 8; i < n; i++) {
        s = FADD(s, FMUL(w[w0 + i], x[i]));
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

// The grouped expert GEMM. The plan lists entries (token, expert) grouped by
// expert; the host cuts each expert's group into tiles of up to TILE_M
// entries: tiles[3 i .. 3 i + 3] = (expert, first entry, entries). Block
// (i, j) computes those entries x outputs j TILE_N .. j TILE_N + TILE_N of
// that expert: rows[r] = in[row r] . w[e][n], over K inputs in slices of
// TILE_K staged in shared memory (gathered through `gather` when given, so
// the tokens are read straight from the batch). 256 threads, each 4 x 4
// outputs at rows ty + 16 a and columns tx + 16 b (conflict-free reads).
// With DUAL the block also computes w3's products and stores the SwiGLU
// silu(w1 . x) * (w3 . x) instead.
#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define TILE_THREADS 256

template <bool DUAL>
DEVICE void grouped_gemm(const WTYPE* w, const WTYPE* w3, const float* in, const int* gather, const int* tiles,
                         float* out, int n_out, int k_in) {
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
            float g = acc[a][b];
            out[(long)(first + r) * n_out + n] = DUAL ? FMUL(g / FADD(1.0f, EXPF(-g)), acc3[a][b]) : g;
        }
    }
}

// h[n, j] = silu(w1[e][j] . x[t]) * (w3[e][j] . x[t]) for plan entry n = (t, e).
KERNEL void expert_hidden(const WTYPE* w1, const WTYPE* w3, const float* x, const int* entry_token,
                          const int* tiles, float* h, int hidden, int d) {
    grouped_gemm<true>(w1, w3, x, entry_token, tiles, h, hidden, d);
}

// y[n, i] = w2[e][i] . h[n]
KERNEL void expert_out(const WTYPE* w2, const float* h, const int* tiles, float* y, int d, int hidden) {
    grouped_gemm<false>(w2, w2, h, nullptr, tiles, y, d, hidden);
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
