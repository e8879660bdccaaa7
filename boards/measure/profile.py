#!/usr/bin/env python3
"""Folds the insn_count plugin's per-address counts (hist=1) into functions
and source lines.

    qemu-system-arm ... -plugin insn_count.so,start=..,stop=..,hist=1 ... 2> out.txt
    python3 boards/measure/profile.py FIRMWARE.elf out.txt [TOP]

Functions come from the symbol table (after LTO most of the library is
inlined into a few functions, so the source lines, from the debug info with
inlining (binutils addr2line), say more); both lists give instructions and their share of all
instructions counted in the windows.
"""
import bisect
import os
import re
import subprocess
import sys


def tool(name):
    sysroot = subprocess.check_output(["rustc", "--print", "sysroot"], text=True).strip()
    host = re.search(r"host: (\S+)", subprocess.check_output(["rustc", "-vV"], text=True)).group(1)
    return os.path.join(sysroot, "lib", "rustlib", host, "bin", name)


def main():
    elf, log = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    counts = {}
    windows = 1
    for line in open(log, errors="replace"):
        m = re.match(r"insn_pc 0x([0-9a-f]+) (\d+)", line)
        if m:
            counts[int(m.group(1), 16)] = int(m.group(2))
        m = re.search(r"insn_count windows=(\d+)", line)
        if m:
            windows = max(1, int(m.group(1)))
    total = sum(counts.values())
    if not total:
        sys.exit("no insn_pc lines: run the plugin with hist=1")
    syms = []
    nm = subprocess.check_output([tool("llvm-nm"), "-C", "--defined-only", "-n", elf], text=True)
    for line in nm.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16) & ~1, parts[2]))
    addrs = [a for a, _ in syms]
    by_fn = {}
    for pc, n in counts.items():
        i = bisect.bisect_right(addrs, pc) - 1
        name = syms[i][1] if i >= 0 else "?"
        by_fn[name] = by_fn.get(name, 0) + n
    pcs = sorted(counts)
    out = subprocess.run(["addr2line", "-e", elf], input="\n".join(hex(p) for p in pcs),
                         capture_output=True, text=True).stdout.splitlines()
    by_line = {}
    for pc, where in zip(pcs, out):
        where = re.sub(r".*/(src|library)/", r"\1/", where)
        by_line[where] = by_line.get(where, 0) + counts[pc]
    print(f"{total // windows} instructions per window ({windows} windows)")
    for title, table in (("functions", by_fn), ("source lines", by_line)):
        print(f"\n{title}:")
        for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{n // windows:9d} {100 * n / total:5.1f}%  {name[:110]}")


if __name__ == "__main__":
    main()
