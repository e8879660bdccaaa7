/*
 * A QEMU TCG plugin (API v1, QEMU 7.2) that counts executed guest
 * instructions between two marker functions, deterministically.
 *
 *   qemu-system-arm ... -plugin ./insn_count.so,start=0x...,stop=0x...
 *
 * Every translated block adds its instruction count to a global counter
 * (inline, no callback per block); the first instruction of the `start` and
 * `stop` functions snapshot it. At exit the plugin prints
 * "insn_count windows=N insns=T" to stderr: T instructions in N windows.
 * These are instructions, not cycles.
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

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t counter, started_at, total, windows;
static uint64_t start_pc, stop_pc;
static bool open_window;

static void on_start(unsigned int vcpu, void *udata) {
    (void)vcpu; (void)udata;
    started_at = counter;
    open_window = true;
}

static void on_stop(unsigned int vcpu, void *udata) {
    (void)vcpu; (void)udata;
    if (open_window) {
        total += counter - started_at;
        windows++;
        open_window = false;
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counter, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        if (pc == start_pc) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_start, QEMU_PLUGIN_CB_NO_REGS, NULL);
        } else if (pc == stop_pc) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_stop, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
    }
}

static void at_exit(qemu_plugin_id_t id, void *udata) {
    (void)id; (void)udata;
    char line[128];
    snprintf(line, sizeof line, "insn_count windows=%llu insns=%llu\n",
             (unsigned long long)windows, (unsigned long long)total);
    qemu_plugin_outs(line);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "start=", 6) == 0) start_pc = strtoull(argv[i] + 6, NULL, 0);
        if (strncmp(argv[i], "stop=", 5) == 0) stop_pc = strtoull(argv[i] + 5, NULL, 0);
    }
    if (!start_pc || !stop_pc) {
        qemu_plugin_outs("insn_count: need start=ADDR,stop=ADDR\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
