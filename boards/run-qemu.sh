#!/usr/bin/env bash
# Builds every emulated board, runs it under QEMU, prints one line per board,
# and exits non-zero if any board fails (a board exits 0 only when every model
# matches the host: integer paths bit for bit).
# Needs: qemu-system-arm, qemu-system-riscv32 (Debian: qemu-system-arm, qemu-system-misc)
# and the targets thumbv6m-none-eabi thumbv7em-none-eabihf thumbv8m.main-none-eabihf
# riscv32imac-unknown-none-elf.
set -uo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="$PWD/target"

boards=(mps2-an386 mps2-an505 microbit riscv32-virt heap-model)
failed=0
for b in "${boards[@]}"; do
  log="$CARGO_TARGET_DIR/$b.log"
  mkdir -p "$CARGO_TARGET_DIR"
  if ! (cd "$b" && cargo build --release --quiet) >"$log" 2>&1; then
    echo "$b: BUILD FAILED (see $log)"; failed=1; continue
  fi
  if (cd "$b" && timeout 120 cargo run --release --quiet) >>"$log" 2>&1; then
    summary=$(grep -E '^[a-z0-9-]+ (f32|f16|int8|q15): [0-9]' "$log" | sed -E 's/^[^ ]+ ([a-z0-9]+): ([0-9]+\/[0-9]+).*/\1 \2/' | paste -sd, -)
    grep -q 'corrupted copy refused' "$log" && summary="$summary, corrupted copy refused"
    echo "$b: PASS ($summary)"
  else
    echo "$b: FAIL"; sed 's/^/    /' "$log" | tail -8; failed=1
  fi
done
# The README's firmware: int8 digits as a user builds it, exit code only.
log="$CARGO_TARGET_DIR/minimal.log"
if (cd minimal && timeout 120 cargo run --release --quiet) >"$log" 2>&1; then
  echo "minimal: PASS (8/8 images classified as on the host)"
else
  echo "minimal: FAIL"; sed 's/^/    /' "$log" | tail -8; failed=1
fi
# The Arm DSP kernels against the portable ones, bit for bit (random shapes and values).
log="$CARGO_TARGET_DIR/mps2-an386-kernels.log"
if (cd mps2-an386 && timeout 120 cargo run --release --quiet --bin kernels) >"$log" 2>&1; then
  echo "mps2-an386 kernels: PASS ($(sed -n 's/.*kernels: \([0-9]*\/[0-9]*\) random.*/\1 random cases/p' "$log") DSP == portable, $(sed -n 's/.*f16 conversion: \([0-9]*\/[0-9]*\) halves.*/\1/p' "$log") halves FPU == half, $(sed -n 's/.*f16 dot and axpy: \([0-9]*\/[0-9]*\) random.*/\1/p' "$log") f16 rows FPU == portable, $(sed -n 's/.*int8 groups: \([0-9]*\/[0-9]*\) random.*/\1/p' "$log") group-scaled int8 DSP == portable)"
else
  echo "mps2-an386 kernels: FAIL"; sed 's/^/    /' "$log" | tail -8; failed=1
fi

# The tiny language model on the M4F: the same tokens and logit bits as the host.
log="$CARGO_TARGET_DIR/mps2-an386-tinylm.log"
if (cd mps2-an386 && timeout 120 cargo run --release --quiet --bin generate) >"$log" 2>&1; then
  echo "mps2-an386 tinylm: PASS ($(sed -n 's/.*tinylm: \([0-9]*\/[0-9]*\) generated tokens.*/\1 tokens/p' "$log"), logits bit-identical)"
else
  echo "mps2-an386 tinylm: FAIL"; sed 's/^/    /' "$log" | tail -8; failed=1
fi
log="$CARGO_TARGET_DIR/mps2-an386-tinylm-g32.log"
if (cd mps2-an386 && timeout 120 cargo run --release --quiet --bin generate_g32) >"$log" 2>&1; then
  echo "mps2-an386 tinylm-g32: PASS ($(sed -n 's/.*tinylm-g32: \([0-9]*\/[0-9]*\) generated tokens.*/\1 tokens/p' "$log"), logits bit-identical, one int8 scale per 32 columns)"
else
  echo "mps2-an386 tinylm-g32: FAIL"; sed 's/^/    /' "$log" | tail -8; failed=1
fi
exit $failed
