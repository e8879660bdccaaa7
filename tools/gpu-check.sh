#!/usr/bin/env bash
# Every GPU check in one command: the CUDA tests (the kernels in the CPU
# emulator and on GPU 0, against the CPU batched path and PyTorch), then the
# throughput table of examples/cuda_bench. A few minutes with a GPU; without
# one the GPU half says why and succeeds. No CUDA toolkit needed to build:
# cudarc loads the driver and NVRTC at run time.
#
#   bash tools/gpu-check.sh          build and run here (cargo, a GPU)
#   bash tools/gpu-check.sh pack     build both programs into .gpu/ for an
#                                    x86-64 GPU machine without Rust
#   bash tools/gpu-check.sh packed   run them there (from the repository root)
#
# The device tool's machines have no Rust and no network: `pack` here, then
# run `bash tools/gpu-check.sh packed` there with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

gpu_line() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not found"
}

case "$mode" in
run)
  gpu_line
  cargo test --release --features cuda --test cuda -- --nocapture --test-threads 1
  cargo run --release --features cuda --example cuda_bench
  ;;
pack)
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
  cargo build --release --features cuda --example cuda_bench
  cp "$test_bin" .gpu/cuda-tests
  cp target/release/examples/cuda_bench .gpu/cuda_bench
  strip .gpu/cuda-tests .gpu/cuda_bench
  # The test binary finds the fixtures and its scratch folder where it was built.
  echo "$PWD" >.gpu/built-in
  ls -l .gpu
  ;;
packed)
  gpu_line
  built_in=$(cat .gpu/built-in)
  if [ "$built_in" != "$PWD" ] && [ ! -e "$built_in" ]; then
    mkdir -p "$(dirname "$built_in")"
    ln -s "$PWD" "$built_in"
  fi
  # cudarc looks for libnvrtc.so or .so.12; a CUDA 13 machine may have only .so.13.
  if ! ldconfig -p | grep -qE 'libnvrtc\.so(\.12)? '; then
    found=$(find /usr/local/cuda*/ /usr/lib /opt -name 'libnvrtc.so*' 2>/dev/null \
      | grep -v alt | sort | tail -1 || true)
    if [ -n "$found" ]; then
      mkdir -p /tmp/nvrtc
      ln -sf "$found" /tmp/nvrtc/libnvrtc.so
      export LD_LIBRARY_PATH="/tmp/nvrtc:$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      echo "NVRTC: $found"
    fi
  fi
  .gpu/cuda-tests --nocapture --test-threads 1
  .gpu/cuda_bench
  ;;
*)
  echo "usage: $0 [run|pack|packed]" >&2
  exit 2
  ;;
esac
