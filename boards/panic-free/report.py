#!/usr/bin/env python3
"""Lists the panic paths a firmware links: every call into core's panic
entry points (bounds checks, unwrap/expect, slice index and length
failures, panic_fmt), each named by the innermost frame of micromoe's own
code in its inline chain (debug info, via addr2line). Usage: report.py ELF"""
import collections, glob, os, re, subprocess, sys

elf = sys.argv[1]
objdump = glob.glob(os.path.expanduser("~/.rustup/toolchains/*/lib/rustlib/*/bin/llvm-objdump"))[0]
dis = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", elf], capture_output=True, text=True).stdout
entry = re.compile(r"^core::(panicking::|.*(_fail|expect_failed|unwrap_failed|panic_bounds_check))")
calls = []
func = None
for l in dis.splitlines():
    m = re.match(r"^[0-9a-f]+ <(.*)>:$", l)
    if m:
        func = m.group(1)
        continue
    m = re.match(r"^\s*([0-9a-f]+):\s+(?:bl|b|b\.w|blx|beq|bne|bhs|blo|bhi|bls|bge|blt|bgt|ble|bcs|bcc)(?:\.w)?\s+\S+\s+<(.*?)(?:\+0x[0-9a-f]+)?>", l)
    if m and func and not entry.match(func) and entry.match(m.group(2)):
        calls.append((m.group(1), m.group(2)))
out = subprocess.run(["addr2line", "-i", "-f", "-C", "-e", elf] + ["0x" + a for a, _ in calls],
                     capture_output=True, text=True).stdout.splitlines()
# addr2line prints (function, file:line) pairs per frame, innermost first;
# frames of one address are not delimited, so ask one address at a time.
sites = collections.Counter()
for addr, callee in calls:
    frames = subprocess.run(["addr2line", "-i", "-C", "-e", elf, "0x" + addr], capture_output=True, text=True).stdout.split()
    own = [f for f in frames if "/rustc/" not in f and ".cargo/registry" not in f]
    where = re.sub(r".*/work/main/", "", own[0]) if own else frames[0] if frames else "?"
    dep = next((re.sub(r".*registry/src/[^/]+/", "", f) for f in frames if ".cargo/registry" in f), "")
    sites[(where, callee.split("::")[-1], dep)] += 1
for (where, callee, dep), n in sorted(sites.items()):
    print(f"{where}  {callee}{'  via ' + dep if dep else ''}")
print(f"{len(sites)} panic sites", file=sys.stderr)
