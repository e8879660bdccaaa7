#!/usr/bin/env bash
# micromoe's decoder beside llama.cpp's on equal work, one thread (outside CI).
#
#   bash benches/llamacpp/run.sh [LLAMA_CPP_SOURCE_DIR] [THREADS]
#
# Builds llama.cpp's llama-bench (CPU, native, Release) from the source dir
# (default /tmp/llamacpp), writes random Mixtral-style GGUFs of widths 512
# and 1024 in f32, f16 and q8_0 (make_gguf.py: the shapes of
# examples/decode_bench.rs's models), and prints llama-bench's pp64 / tg64
# beside decode_bench's prefill / decode, pinned to core 0 when THREADS is 1.
# Needs cmake, a C++ compiler, numpy (pip install cmake numpy).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
src="${1:-/tmp/llamacpp}"
threads="${2:-1}"
work="${WORK:-/tmp/llamacpp-work}"
mkdir -p "$work"
if [ ! -x "$src/build/bin/llama-bench" ]; then
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF >/dev/null
  cmake --build "$src/build" -j2 --target llama-bench >/dev/null
fi
[ -f "$work/mixtral-1024-q8_0.gguf" ] || PYTHONPATH="$src/gguf-py" python3 "$repo/benches/llamacpp/make_gguf.py" "$work" 512 1024
(cd "$repo" && cargo build --release --quiet --example decode_bench)
pin=()
[ "$threads" = 1 ] && pin=(taskset -c 0)
echo "llama.cpp $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo '(source dir)'), $threads thread(s)"
printf '%-6s %-11s %12s %12s %6s %12s %12s %6s\n' width types "pp64 llama" "prefill us" ratio "tg64 llama" "decode us" ratio
ours=$("${pin[@]}" "$repo/target/release/examples/decode_bench" --runs 5 --threads "$threads")
for h in 512 1024; do
  for pair in f32:f32 f16:f16 q8_0:int8; do
    g=${pair%%:*}; m=${pair##*:}
    bench=$("${pin[@]}" "$src/build/bin/llama-bench" -m "$work/mixtral-$h-$g.gguf" -t "$threads" -p 64 -n 64 -r 5 -o csv 2>/dev/null)
    # avg_ts of the row whose n_prompt (n_gen) is 64, columns found by name.
    col() { echo "$bench" | awk -F, -v want="$1" 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
      { gsub(/"/, "") } $(c[want]) == 64 { print $(c["avg_ts"]) }' | head -1; }
    pp=$(col n_prompt); tg=$(col n_gen)
    read -r p d < <(echo "$ours" | awk -v h="$h" -v t="$m" '$1 == h && $2 == t { print $3, $4 }')
    printf '%-6s %-11s %12.1f %12.1f %6.2f %12.1f %12.1f %6.2f\n' "$h" "$g/$m" "$pp" "$p" "$(echo "$p / $pp" | bc -l)" "$tg" "$d" "$(echo "$d / $tg" | bc -l)"
  done
done
