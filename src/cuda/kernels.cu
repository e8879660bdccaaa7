// micromoe's CUDA kernels, compiled at run time by NVRTC (one program per
// weight type: WTYPE is float or unsigned short holding f16 bits).
// Threads compute whole outputs in a fixed order, so results do not depend on
// the batch or the launch shape. The gate follows the CPU kernel's dot order
// (eight lanes, fixed tree, no fused multiply-add) so router logits, and so the
// chosen experts, are the CPU's bit for bit.

#ifdef MICROMOE_CLANG_CHECK
// A syntax check with clang and no CUDA headers.
#define GLOBAL_ID() (__nvvm_read_ptx_sreg_ctaid_x() * __nvvm_read_ptx_sreg_ntid_x() + __nvvm_read_ptx_sreg_tid_x())
#define FMUL(a, b) ((a) * (b))
#define FADD(a, b) ((a) + (b))
// No libdevice in a header-less check: a stand-in keeps the code compiling.
#define EXPF(x) (x)
#define AS_FLOAT(i) __builtin_bit_cast(float, i)
#define KERNEL extern "C" __attribute__((global))
#define DEVICE __attribute__((device))
#else
#define GLOBAL_ID() (blockIdx.x * blockDim.x + threadIdx.x)
#define FMUL(a, b) __fmul_rn(a, b)
#define FADD(a, b) __fadd_rn(a, b)
#define EXPF(x) expf(x)
#define AS_FLOAT(i) __int_as_float(i)
#define KERNEL extern "C" __global__
#define DEVICE __device__
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
DEVICE float dot(const WTYPE* w, long w0, const float* x, int n) {
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

// logits[t, e] = gate[e] . x[t]
KERNEL void gate_logits(const WTYPE* gate, const float* x, float* logits, int tokens, int experts, int d) {
    long id = GLOBAL_ID();
    if (id >= (long)tokens * experts) return;
    int t = id / experts, e = id % experts;
    logits[id] = dot(gate, (long)e * d, x + (long)t * d, d);
}

// h[n, j] = silu(w1[e] [j] . x[t]) * (w3[e][j] . x[t]) for plan entry n = (t, e):
// the grouped expert GEMM over each expert's gathered tokens, SwiGLU fused.
KERNEL void expert_hidden(const WTYPE* w1, const WTYPE* w3, const float* x, const int* entry_token,
                          const int* entry_expert, float* h, int entries, int hidden, int d) {
    long id = GLOBAL_ID();
    if (id >= (long)entries * hidden) return;
    int n = id / hidden, j = id % hidden;
    long row = ((long)entry_expert[n] * hidden + j) * d;
    const float* xt = x + (long)entry_token[n] * d;
    float g = dot(w1, row, xt, d), u = dot(w3, row, xt, d);
    h[id] = FMUL(g / FADD(1.0f, EXPF(-g)), u);
}

// y[n, i] = w2[e][i] . h[n]
KERNEL void expert_out(const WTYPE* w2, const float* h, const int* entry_expert, float* y, int entries, int d,
                       int hidden) {
    long id = GLOBAL_ID();
    if (id >= (long)entries * d) return;
    int n = id / d, i = id % d;
    y[id] = dot(w2, ((long)entry_expert[n] * d + i) * hidden, h + (long)n * hidden, hidden);
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
