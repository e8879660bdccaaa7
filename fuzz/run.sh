#!/usr/bin/env bash
# Fuzzing, in two forms (README: "Bad input, fuzzing and limits").
#
#   bash fuzz/run.sh ci           seeds, the stable stand-in over them, then the
#                                 real libFuzzer targets built with nightly and run
#                                 for $FUZZ_SECONDS (default 20) each
#   bash fuzz/run.sh long SECS    each target for SECS (the README's figures)
#
# The real targets are built with the flags cargo-fuzz uses (coverage counters,
# compare tracing, AddressSanitizer), so no cargo-fuzz install is needed;
# `cargo +nightly fuzz run <target>` works the same where it is installed.
set -euo pipefail
cd "$(dirname "$0")"
targets=(parse_infer decoder checkpoint)
triple=x86_64-unknown-linux-gnu

build() {
  RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address -Cdebug-assertions" \
    CARGO_TARGET_DIR=target/libfuzzer cargo +nightly build --locked --release --target "$triple" \
    $(printf -- '--bin %s ' "${targets[@]}")
}

run() { # target seconds
  mkdir -p "artifacts/$1"
  # LeakSanitizer off at exit as well as while fuzzing: std's thread-local destructor
  # registration (threads of infer_batch) shows as a leak at exit, which libFuzzer
  # would write as a crash of the empty input.
  ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  "target/libfuzzer/$triple/release/$1" -max_total_time="$2" -timeout=10 -rss_limit_mb=2048 \
    -detect_leaks=0 -print_final_stats=1 -artifact_prefix="artifacts/$1/" "corpus/$1" 2>&1 |
    grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::number_of_executed_units|stat::peak_rss|==[0-9]+==ERROR|thread .* panicked|SUMMARY)' || true
  if compgen -G "artifacts/$1/*" >/dev/null; then
    echo "fuzz target $1 found a failure: $(ls "artifacts/$1")"
    return 1
  fi
}

case "${1:-ci}" in
  ci)
    cargo run --locked --release --bin seeds -- write
    cargo run --locked --release --bin seeds -- check 200
    if cargo +nightly --version >/dev/null 2>&1; then
      build
      for t in "${targets[@]}"; do run "$t" "${FUZZ_SECONDS:-20}"; done
    else
      echo "no nightly toolchain: libFuzzer targets not built (the stand-in above ran)"
    fi
    ;;
  long)
    [ -d corpus/parse_infer ] || cargo run --locked --release --bin seeds -- write
    build
    for t in "${targets[@]}"; do run "$t" "${2:-3600}"; done
    ;;
  *) echo "usage: $0 ci | long SECONDS" >&2; exit 2 ;;
esac
