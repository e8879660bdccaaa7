#!/usr/bin/env bash
# One JSON object per line for each emulated board and model type:
#   {"board", "dtype", "flash_bytes", "static_ram_bytes", "stack_bytes", "insns_per_inference"}
# flash_bytes: code + read-only data + initialized data of a firmware that carries that one
# model (and the check around it); static_ram_bytes: .data + .bss; stack_bytes: high-water
# mark of the stack during the inferences, found by painting; insns_per_inference: guest
# instructions executed inside Model::infer (input quantization to output), averaged over 32
# images and counted deterministically by a QEMU TCG plugin (boards/measure/insn_count.c).
# Instructions, not cycles. The last line is the tiny language model (instructions per token).
# Needs what run-qemu.sh needs, plus gcc and `rustup component add llvm-tools`.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="$PWD/target"
mkdir -p "$CARGO_TARGET_DIR"
bin="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
plugin="$CARGO_TARGET_DIR/insn_count.so"
gcc -O2 -Wall -shared -fPIC -o "$plugin" measure/insn_count.c

declare -A target=([mps2-an386]=thumbv7em-none-eabihf [mps2-an505]=thumbv8m.main-none-eabihf
                   [microbit]=thumbv6m-none-eabi [riscv32-virt]=riscv32imac-unknown-none-elf)
declare -A qemu=([mps2-an386]="qemu-system-arm -M mps2-an386" [mps2-an505]="qemu-system-arm -M mps2-an505"
                 [microbit]="qemu-system-arm -M microbit" [riscv32-virt]="qemu-system-riscv32 -M virt -bios none")

for board in mps2-an386 mps2-an505 microbit riscv32-virt; do
  for dtype in f32 f16 int8 q15; do
    (cd "$board" && cargo build --release --quiet --no-default-features --features "$dtype")
    elf="$CARGO_TARGET_DIR/${target[$board]}/release/micromoe-$board"
    cp "$elf" "$CARGO_TARGET_DIR/$board-$dtype.elf"
    elf="$CARGO_TARGET_DIR/$board-$dtype.elf"
    sizes=$("$bin/llvm-size" -A "$elf")
    section() { echo "$sizes" | awk -v s="$1" '$1 == s { print $2 }' | head -1; }
    sum() { local t=0 v; for s in "$@"; do v=$(section "$s"); t=$((t + ${v:-0})); done; echo $t; }
    flash=$(sum .vector_table .init .trap .text .rodata .data .sdata .srodata)
    ram=$(sum .data .bss .sdata .sbss .uninit)
    addr() { "$bin/llvm-nm" "$elf" | awk -v s="$1" '$3 == s { print "0x" $1 }' | head -1; }
    start=$(( $(addr micromoe_measure_start) & ~1 ))
    stop=$(( $(addr micromoe_measure_stop) & ~1 ))
    out=$(${qemu[$board]} -nographic -monitor none -serial none \
      -semihosting-config enable=on,target=native -d plugin -plugin "$plugin,start=$start,stop=$stop" -kernel "$elf" 2>&1)
    stack=$(echo "$out" | sed -n "s/^$board $dtype: stack_bytes \([0-9]*\)/\1/p")
    windows=$(echo "$out" | sed -n 's/.*windows=\([0-9]*\).*/\1/p')
    insns=$(echo "$out" | sed -n 's/.*insns=\([0-9]*\).*/\1/p')
    echo "$out" | grep -q "^$board: PASS" || { echo "$board $dtype: check failed" >&2; echo "$out" >&2; exit 1; }
    printf '{"board":"%s","dtype":"%s","flash_bytes":%d,"static_ram_bytes":%d,"stack_bytes":%d,"insns_per_inference":%d}\n' \
      "$board" "$dtype" "$flash" "$ram" "$stack" $(( insns / windows ))
  done
done

# The README's firmware (boards/minimal): the int8 digits model as a user builds it, on the
# Cortex-M4F: flash beyond the model (code, read-only data and the 8 test images; the model
# file's bytes subtracted), the stack high-water mark, instructions per inference (8 images)
# and instructions of one Model::parse (CRC and full validation):
#   {"board", "firmware", "flash_beyond_model_bytes", "scratch_bytes", "stack_bytes", "insns_per_inference", "insns_parse"}
minimal() {
  (cd minimal && cargo build --release --quiet "$@")
  local elf="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/micromoe-minimal"
  cp "$elf" "$CARGO_TARGET_DIR/minimal${2:+-$2}.elf"
  echo "$CARGO_TARGET_DIR/minimal${2:+-$2}.elf"
}
run_window() {
  local elf=$1 start stop
  start=$(( $("$bin/llvm-nm" "$elf" | awk '$3 == "micromoe_measure_start" { print "0x" $1 }') & ~1 ))
  stop=$(( $("$bin/llvm-nm" "$elf" | awk '$3 == "micromoe_measure_stop" { print "0x" $1 }') & ~1 ))
  qemu-system-arm -M mps2-an386 -nographic -monitor none -serial none -semihosting-config enable=on,target=native \
    -d plugin -plugin "$plugin,start=$start,stop=$stop" -kernel "$elf" 2>&1
}
elf=$(minimal)
qemu-system-arm -M mps2-an386 -nographic -monitor none -serial none -semihosting-config enable=on,target=native \
  -kernel "$elf" || { echo "minimal: check failed" >&2; exit 1; }
# No formatting machinery in a firmware that formats nothing: an error type's
# Display or a panic message reaching the inference path would link core::fmt.
if "$bin/llvm-nm" -C "$elf" | grep -q 'core::fmt'; then
  echo "minimal: core::fmt is linked:" >&2; "$bin/llvm-nm" -C "$elf" | grep 'core::fmt' | head >&2; exit 1
fi
sizes=$("$bin/llvm-size" -A "$elf")
flash=$(echo "$sizes" | awk '$1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" || $1 == ".data" { t += $2 } END { print t }')
model=$(stat -c %s ../models/digits/digits_int8.moe)
out=$(run_window "$(minimal --features measure)")
echo "$out" | grep -q "^minimal: PASS" || { echo "minimal: check failed" >&2; echo "$out" >&2; exit 1; }
stack=$(echo "$out" | sed -n 's/^minimal: stack_bytes \([0-9]*\)/\1/p')
w=$(echo "$out" | sed -n 's/.*windows=\([0-9]*\).*/\1/p'); i=$(echo "$out" | sed -n 's/.*insns=\([0-9]*\).*/\1/p')
out=$(run_window "$(minimal --features parse)")
parse=$(echo "$out" | sed -n 's/.*insns=\([0-9]*\).*/\1/p')
scratch=$(cd .. && cargo run --release --quiet --bin micromoe -- info models/digits/digits_int8.moe | sed -n 's/.*(\([0-9]*\) on the integer path).*/\1/p')
printf '{"board":"mps2-an386","firmware":"minimal-int8","flash_beyond_model_bytes":%d,"scratch_bytes":%d,"stack_bytes":%d,"insns_per_inference":%d,"insns_parse":%d}\n' \
  $((flash - model)) "$scratch" "$stack" $((i / w)) "$parse"

# The int8 and Q15 matrix-vector kernels on the Cortex-M4F, one product per shape (outputs x
# inputs), Arm DSP path then portable path: one line each,
#   {"kernel", "dtype", "shape", "insns_per_mac", "est_cycles_per_mac"}
# from the same plugin with each=1 (per-window counts); cycles are the plugin's Cortex-M4 timing
# model (boards/measure/insn_count.c), instructions are exact. One call each: requantization,
# bias and the input expansion are included.
board=mps2-an386
(cd "$board" && cargo build --release --quiet --bin kernels)
elf="$CARGO_TARGET_DIR/${target[$board]}/release/kernels"
addr() { "$bin/llvm-nm" "$elf" | awk -v s="$1" '$3 == s { print "0x" $1 }' | head -1; }
start=$(( $(addr micromoe_measure_start) & ~1 ))
stop=$(( $(addr micromoe_measure_stop) & ~1 ))
out=$(${qemu[$board]} -nographic -monitor none -serial none \
  -semihosting-config enable=on,target=native -d plugin -plugin "$plugin,start=$start,stop=$stop,each=1" -kernel "$elf" 2>&1)
echo "$out" | grep -q "kernels: \([0-9]*\)/\1 random cases bit-identical" || { echo "$board kernels: check failed" >&2; echo "$out" >&2; exit 1; }
w=0
for kernel in matvec_dsp matvec_portable; do
  for dtype in int8 q15; do
    for shape in 64x64 128x256 256x512; do
      line=$(echo "$out" | grep "window=$w ")
      insns=$(echo "$line" | sed -n 's/.*insns=\([0-9]*\).*/\1/p')
      cycles=$(echo "$line" | sed -n 's/.*cycles=\([0-9]*\).*/\1/p')
      macs=$(( ${shape%x*} * ${shape#*x} ))
      awk -v k="$kernel" -v d="$dtype" -v s="$shape" -v i="$insns" -v c="$cycles" -v m="$macs" \
        'BEGIN { printf "{\"kernel\":\"%s\",\"dtype\":\"%s\",\"shape\":\"%s\",\"insns_per_mac\":%.3f,\"est_cycles_per_mac\":%.3f}\n", k, d, s, i / m, c / m }'
      w=$((w + 1))
    done
  done
done

# The tiny language model (int8 weights, f16 KV cache) on the Cortex-M4F: instructions per
# token (each decoder step, prompt and generated tokens alike, averaged over 63 steps), the
# firmware's flash and static RAM, and the decoder state (KV cache + work buffers, on the stack).
board=mps2-an386
tinylm() { # binary, model file, label
(cd "$board" && cargo build --release --quiet --bin "$1")
elf="$CARGO_TARGET_DIR/${target[$board]}/release/$1"
sizes=$("$bin/llvm-size" -A "$elf")
section() { echo "$sizes" | awk -v s="$1" '$1 == s { print $2 }' | head -1; }
sum() { local t=0 v; for s in "$@"; do v=$(section "$s"); t=$((t + ${v:-0})); done; echo $t; }
flash=$(sum .vector_table .text .rodata .data)
ram=$(sum .data .bss .uninit)
addr() { "$bin/llvm-nm" "$elf" | awk -v s="$1" '$3 == s { print "0x" $1 }' | head -1; }
start=$(( $(addr micromoe_measure_start) & ~1 ))
stop=$(( $(addr micromoe_measure_stop) & ~1 ))
out=$(${qemu[$board]} -nographic -monitor none -serial none \
  -semihosting-config enable=on,target=native -d plugin -plugin "$plugin,start=$start,stop=$stop" -kernel "$elf" 2>&1)
echo "$out" | grep -q "$3: .*: ok" || { echo "$board $3: check failed" >&2; echo "$out" >&2; exit 1; }
windows=$(echo "$out" | sed -n 's/.*windows=\([0-9]*\).*/\1/p')
insns=$(echo "$out" | sed -n 's/.*insns=\([0-9]*\).*/\1/p')
state=$(cd .. && cargo run --release --quiet --bin micromoe -- info "models/tinylm/$2" --json | sed -n 's/.*"state_bytes":\([0-9]*\).*/\1/p')
printf '{"board":"%s","model":"%s","flash_bytes":%d,"static_ram_bytes":%d,"state_bytes":%d,"insns_per_token":%d}\n' \
  "$board" "$3-int8" "$flash" "$ram" "$state" $(( insns / windows ))
}
tinylm generate tinylm_int8.moe tinylm
# The same model with one int8 scale per 32 columns (--group 32).
tinylm generate_g32 tinylm_int8_g32.moe tinylm-g32
