#!/usr/bin/env bash
# micromoe's decoder beside llama.cpp's on the same weights, one thread
# (outside CI).
#
#   bash benches/llamacpp/run.sh [LLAMA_CPP_SOURCE_DIR] [THREADS]
#
# 1. builds llama.cpp's llama-bench (CPU, GGML_NATIVE, Release) in $BUILD
#    (default SOURCE/build) unless it is there (default source
#    /tmp/llamacpp; when that is missing and $LLAMACPP_GIT names a llama.cpp
#    git dir, its HEAD is extracted there first);
# 2. make_models.py: random seeded MixtralForCausalLM checkpoints, widths
#    512 and 1024 (float32 safetensors and a small sentencepiece tokenizer);
# 3. converts each to GGUF f32, f16, q8_0 (llama.cpp's convert_hf_to_gguf.py)
#    and to .moe f32, f16, int8 (micromoe convert --context 512);
# 4. check_logits.py: micromoe's f32 logits against transformers';
# 5. llama-bench -p 64 -n 64 -r 5 and decode_bench --runs 5 per model,
#    pinned to core 0 when THREADS is 1, and one table of both.
#
# Artifacts go to $WORK (default /tmp/llamacpp-work). Needs cmake, a C++
# compiler, bc, and python3 with torch, transformers, safetensors,
# sentencepiece, numpy (gguf-py is taken from the llama.cpp tree).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/benches/llamacpp"
src="${1:-/tmp/llamacpp}"
threads="${2:-1}"
work="${WORK:-/tmp/llamacpp-work}"
widths="${WIDTHS:-512 1024}"
build="${BUILD:-$src/build}"
mkdir -p "$work/hf" "$work/gguf" "$work/moe"

if [ ! -d "$src" ] && [ -n "${LLAMACPP_GIT:-}" ]; then
  # Without models/ (its vocab GGUFs are not needed, and a partial mirror
  # may lack their blobs; git then still warns about one, harmlessly).
  mkdir -p "$src"
  git --git-dir="$LLAMACPP_GIT" archive HEAD $(git --git-dir="$LLAMACPP_GIT" ls-tree HEAD --name-only | grep -vx models) \
    | tar -x -C "$src"
fi
if [ ! -x "$build/bin/llama-bench" ]; then
  echo "building llama-bench in $build" >&2
  # The compilers' output (thousands of warning lines) goes to a log,
  # shown only when the build fails.
  log="$work/llama-build.log"
  { cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF \
      && cmake --build "$build" -j2 --target llama-bench; } >"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; echo "llama.cpp build failed: $log" >&2; exit 1; }
fi
(cd "$repo" && cargo build --release --quiet && cargo build --release --quiet --example decode_bench)
mm="$repo/target/release/micromoe"

for h in $widths; do
  hf="$work/hf/mixtral-$h"
  [ -f "$hf/model.safetensors" ] || python3 "$here/make_models.py" "$work/hf" "$h" >/dev/null 2>&1
  for t in f32 f16 q8_0; do
    out="$work/gguf/mixtral-$h-$t.gguf"
    [ -f "$out" ] || PYTHONPATH="$src/gguf-py" python3 "$src/convert_hf_to_gguf.py" "$hf" \
      --outtype "$t" --outfile "$out" >/dev/null 2>&1
  done
  for t in f32 f16 int8; do
    out="$work/moe/mixtral-$h-$t.moe"
    [ -f "$out" ] || "$mm" convert "$hf" -o "$out" --dtype "$t" --context 512 >/dev/null 2>&1
  done
  python3 "$here/check_logits.py" "$hf" "$work/moe/mixtral-$h-f32.moe" "$mm" 2>/dev/null \
    || echo "logits check failed for width $h" >&2
done

pin=()
[ "$threads" = 1 ] && pin=(taskset -c 0)
rev=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || git --git-dir="${LLAMACPP_GIT:-/nonexistent}" rev-parse --short HEAD 2>/dev/null || echo "source dir $src")
echo "llama.cpp $rev, $(nproc) cores, $threads thread(s); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
printf '%-6s %-10s %10s %10s %6s %10s %10s %6s\n' width types "pp64 llama" "prefill mm" ratio "tg64 llama" "decode mm" ratio
for h in $widths; do
  for pair in f32:f32 f16:f16 q8_0:int8; do
    g=${pair%%:*}; m=${pair##*:}
    bench=$("${pin[@]}" "$build/bin/llama-bench" -m "$work/gguf/mixtral-$h-$g.gguf" \
      -t "$threads" -p 64 -n 64 -r 5 -o csv 2>/dev/null)
    # avg_ts of the row whose n_prompt (n_gen) is 64, columns found by name.
    col() { echo "$bench" | awk -F, -v want="$1" 'NR == 1 { gsub(/"/, ""); for (i = 1; i <= NF; i++) c[$i] = i; next }
      { gsub(/"/, "") } $(c[want]) == 64 { print $(c["avg_ts"]) }' | head -1; }
    pp=$(col n_prompt); tg=$(col n_gen)
    # decode_bench --model prints: hidden  path  prompt_tok/s  decode_tok/s
    read -r p d < <("${pin[@]}" "$repo/target/release/examples/decode_bench" \
      --model "$work/moe/mixtral-$h-$m.moe" --runs 5 --threads "$threads" | awk 'NR > 1 { print $3, $4 }')
    printf '%-6s %-10s %10.1f %10.1f %6.2f %10.1f %10.1f %6.2f\n' "$h" "$m/$g" "$pp" "$p" \
      "$(echo "$p / $pp" | bc -l)" "$tg" "$d" "$(echo "$d / $tg" | bc -l)"
  done
done
