#!/usr/bin/env bash
# Every GPU check in one command (a few minutes on a machine with an NVIDIA GPU
# and its driver; CUDA toolkit not needed: cudarc loads the driver and NVRTC at
# run time): the CUDA tests against the CPU and PyTorch fixtures, then the
# throughput table. Without a GPU both say why and succeed.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: not found"
cargo test --release --features cuda --test cuda -- --nocapture
cargo run --release --features cuda --example cuda_bench
