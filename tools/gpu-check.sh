#!/usr/bin/env bash
# Every GPU check in one command: the CUDA tests (the kernels in the CPU
# emulator and on GPU 0, layers against the CPU batched path and PyTorch,
# whole decoders and the CLI's --device cuda against the CPU decoder), then
# the throughput tables of examples/cuda_bench (a layer; a decoder's prefill
# and decode at 1 / 16 / 64 sequences) and, where python3 has torch with
# CUDA and transformers, tools/torch_moe_bench.py (PyTorch eager on the same
# layer). A few minutes with a GPU; without one the GPU half says why and
# succeeds. No CUDA toolkit needed to build: cudarc loads the driver and
# NVRTC at run time.
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

torch_bench() {
  if command -v python3 >/dev/null; then
    python3 tools/torch_moe_bench.py "$1" || echo "torch_moe_bench failed (above)"
  else
    echo "torch_moe_bench: skipped (no python3)"
  fi
}

case "$mode" in
run)
  gpu_line
  # The emulator half runs in CI (.ci/run); here the GPU's.
  MICROMOE_SKIP_EMULATOR=1 cargo test --release --features cuda --test cuda -- --nocapture --test-threads 1
  cargo run --release --features cuda --example cuda_bench -- --save-layer target/layer.safetensors
  torch_bench target/layer.safetensors
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
  # The CLI tests run the micromoe binary the test binary was built beside.
  cp target/release/micromoe .gpu/micromoe
  strip .gpu/cuda-tests .gpu/cuda_bench .gpu/micromoe
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
  if [ ! -x target/release/micromoe ]; then
    mkdir -p target/release
    ln -sf "$PWD/.gpu/micromoe" target/release/micromoe
  fi
  MICROMOE_SKIP_EMULATOR=1 .gpu/cuda-tests --nocapture --test-threads 1
  .gpu/cuda_bench --save-layer .gpu/layer.safetensors
  torch_bench .gpu/layer.safetensors
  ;;
*)
  echo "usage: $0 [run|pack|packed]" >&2
  exit 2
  ;;
esac
