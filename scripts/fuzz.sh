#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (FUZZ_SECONDS, default 60) with
# cargo fuzz on the stable toolchain (libFuzzer without a sanitizer, built
# with debug assertions: Rust panics and arithmetic overflow are what it
# finds). A crash fails the script and leaves the input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
mkdir -p logs
for target in frame_decoder http_request; do
  mkdir -p "corpus/$target"
  echo "==> fuzzing $target for ${seconds}s"
  log="logs/$target.log"
  if ! cargo fuzz run --sanitizer none --release --debug-assertions "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzzing $target found a crash (input under fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || tail -n 5 "$log"
done
echo "==> fuzzing found no crash"
