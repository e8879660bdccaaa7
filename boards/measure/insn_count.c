/*
 * A QEMU TCG plugin (API v1, QEMU 7.2) that counts executed guest
 * instructions between two marker functions, deterministically.
 *
 *   qemu-system-arm ... -plugin ./insn_count.so,start=0x...,stop=0x...
 *
 * Every translated block adds its instruction count to a global counter
 * (inline, no callback per block); the first instruction of the `start` and
 * `stop` functions snapshot it. At exit the plugin prints
 * "insn_count windows=N insns=T cycles=C" to stderr: T instructions in N
 * windows, and with `each=1` one line per window as well. With `hist=1` it
 * also counts every instruction executed inside a window by address and
 * prints "insn_pc 0xADDR N" per address (slower: a callback per
 * instruction); boards/measure/profile.py folds that into functions and
 * source lines.
 *
 * Cycles are an estimate: every executed instruction is weighed by its
 * Cortex-M4 timing class (Technical Reference Manual, table 3-1, zero wait
 * states), decided once per instruction from QEMU's disassembly:
 *   single loads and stores (LDR*, STR*)           2  (no credit for pipelining)
 *   LDRD / STRD                                     3
 *   LDM / STM / PUSH / POP, VLDM / VSTM / VPUSH / VPOP   1 + N registers (+ 2 if POP loads PC)
 *   VLDR / VSTR                                     2
 *   branches: unconditional, calls, returns, and conditional branches
 *     backwards (loops, assumed taken)              1 + P with P = 2
 *   conditional branches forwards (assumed not taken), CBZ/CBNZ forwards   1
 *   SDIV / UDIV                                     7  (2 to 12)
 *   VDIV / VSQRT 14; VMLA / VMLS / VFMA / VFMS 3
 *   everything else (ALU, MUL / MLA / SMLAD / SMLAL, SXTB16, VADD, ...)   1
 * Instructions are exact; cycles are a model, not a measurement.
 *
 * Debian ships no qemu-plugin.h, so the few declarations used are written
 * out here, as the v1 API defines them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct {
    char *target_name;
    int version_min;
    int version_current;
    bool system_emulation;
    union {
        struct { int smp_vcpus; int max_vcpus; } system;
    };
} qemu_info_t;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS = 0 };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 = 0 };

typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr, uint64_t imm);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                                   enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
extern void qemu_plugin_outs(const char *string);
extern char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op,
                                                       void *ptr, uint64_t imm);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_WINDOWS 4096
static uint64_t counter, cycles, started_at, cycles_at, total, total_cycles, windows;
static uint64_t each_insns[MAX_WINDOWS], each_cycles[MAX_WINDOWS];
static uint64_t start_pc, stop_pc;
static bool open_window, each, hist;

/* hist=1: executions per instruction address inside windows (open addressing). */
#define HIST_SLOTS (1u << 16)
static uint64_t hist_pc[HIST_SLOTS], hist_n[HIST_SLOTS];

static void on_insn(unsigned int vcpu, void *udata) {
    (void)vcpu;
    if (!open_window) return;
    uint64_t pc = (uint64_t)(uintptr_t)udata;
    uint32_t h = (uint32_t)((pc >> 1) * 2654435761u) & (HIST_SLOTS - 1);
    for (uint32_t probe = 0; probe < HIST_SLOTS; probe++, h = (h + 1) & (HIST_SLOTS - 1)) {
        if (hist_pc[h] == pc || hist_n[h] == 0) {
            hist_pc[h] = pc;
            hist_n[h]++;
            return;
        }
    }
}

static void on_start(unsigned int vcpu, void *udata) {
    (void)vcpu; (void)udata;
    started_at = counter;
    cycles_at = cycles;
    open_window = true;
}

static void on_stop(unsigned int vcpu, void *udata) {
    (void)vcpu; (void)udata;
    if (open_window) {
        if (windows < MAX_WINDOWS) {
            each_insns[windows] = counter - started_at;
            each_cycles[windows] = cycles - cycles_at;
        }
        total += counter - started_at;
        total_cycles += cycles - cycles_at;
        windows++;
        open_window = false;
    }
}

static bool starts(const char *s, const char *prefix) { return strncmp(s, prefix, strlen(prefix)) == 0; }

/* Registers in a "{r4, r5-r7, pc}" list. */
static int reglist(const char *d) {
    const char *open = strchr(d, '{'), *close = strchr(d, '}');
    if (!open || !close) return 1;
    int n = 0;
    for (const char *p = open + 1; p < close; p++) {
        if (*p == 'r' || *p == 's' || *p == 'd' || *p == 'l' || *p == 'p') {
            /* a register name starts here; a range r4-r7 counts its span */
            const char *dash = strchr(p, '-'), *comma = strchr(p, ',');
            if (dash && dash < close && (!comma || dash < comma)) {
                int a = atoi(p + 1), b = atoi(dash + 2);
                n += (b >= a ? b - a + 1 : 1);
                p = (comma && comma < close) ? comma : close - 1;
            } else {
                n++;
                p = (comma && comma < close) ? comma : close - 1;
            }
        }
    }
    return n ? n : 1;
}

static const char *conds[] = {"eq", "ne", "cs", "hs", "cc", "lo", "mi", "pl", "vs", "vc",
                              "hi", "ls", "ge", "lt", "gt", "le", NULL};

/* Estimated Cortex-M4 cycles of one instruction (see the header). */
static uint64_t weight(const char *d, uint64_t pc) {
    char m[16] = {0};
    int i = 0;
    while (d[i] && d[i] != ' ' && d[i] != '\t' && i < 15) { m[i] = d[i]; i++; }
    char *dot = strchr(m, '.');
    if (dot) *dot = 0;
    const char *t = strstr(d, "#0x");
    uint64_t target = t ? strtoull(t + 1, NULL, 16) : 0;
    bool backward = t && target <= pc;
    if (starts(m, "cbz") || starts(m, "cbnz")) return backward ? 3 : 1;
    if (m[0] == 'b' && (m[1] == 0 || !strcmp(m, "bl") || !strcmp(m, "blx") || !strcmp(m, "bx"))) return 3;
    if (m[0] == 'b' && strlen(m) == 3) {
        for (int c = 0; conds[c]; c++)
            if (!strcmp(m + 1, conds[c])) return backward ? 3 : 1;
    }
    if (starts(m, "pop") || starts(m, "ldm")) return 1 + reglist(d) + (strstr(d, "pc}") ? 2 : 0);
    if (starts(m, "push") || starts(m, "stm") || starts(m, "vpush") || starts(m, "vpop") || starts(m, "vldm") ||
        starts(m, "vstm"))
        return 1 + reglist(d);
    if (starts(m, "ldrd") || starts(m, "strd")) return 3;
    if (starts(m, "ldr") || starts(m, "str") || starts(m, "vldr") || starts(m, "vstr")) return 2;
    if (starts(m, "sdiv") || starts(m, "udiv")) return 7;
    if (starts(m, "vdiv") || starts(m, "vsqrt")) return 14;
    if (starts(m, "vmla") || starts(m, "vmls") || starts(m, "vfma") || starts(m, "vfms") || starts(m, "vfnm")) return 3;
    return 1;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counter, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        char *d = qemu_plugin_insn_disas(insn);
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &cycles, d ? weight(d, pc) : 1);
        free(d);
        if (hist) qemu_plugin_register_vcpu_insn_exec_cb(insn, on_insn, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)pc);
        if (pc == start_pc) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_start, QEMU_PLUGIN_CB_NO_REGS, NULL);
        } else if (pc == stop_pc) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_stop, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
    }
}

static void at_exit(qemu_plugin_id_t id, void *udata) {
    (void)id; (void)udata;
    char line[160];
    if (each) {
        for (uint64_t w = 0; w < windows && w < MAX_WINDOWS; w++) {
            snprintf(line, sizeof line, "insn_count window=%llu insns=%llu cycles=%llu\n", (unsigned long long)w,
                     (unsigned long long)each_insns[w], (unsigned long long)each_cycles[w]);
            qemu_plugin_outs(line);
        }
    }
    for (uint32_t h = 0; hist && h < HIST_SLOTS; h++) {
        if (hist_n[h]) {
            snprintf(line, sizeof line, "insn_pc 0x%llx %llu\n", (unsigned long long)hist_pc[h],
                     (unsigned long long)hist_n[h]);
            qemu_plugin_outs(line);
        }
    }
    snprintf(line, sizeof line, "insn_count windows=%llu insns=%llu cycles=%llu\n", (unsigned long long)windows,
             (unsigned long long)total, (unsigned long long)total_cycles);
    qemu_plugin_outs(line);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "start=", 6) == 0) start_pc = strtoull(argv[i] + 6, NULL, 0);
        if (strncmp(argv[i], "stop=", 5) == 0) stop_pc = strtoull(argv[i] + 5, NULL, 0);
        if (strcmp(argv[i], "each=1") == 0) each = true;
        if (strcmp(argv[i], "hist=1") == 0) hist = true;
    }
    if (!start_pc || !stop_pc) {
        qemu_plugin_outs("insn_count: need start=ADDR,stop=ADDR\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
