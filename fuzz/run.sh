#!/usr/bin/env bash
# Runs fuzz targets one after another for a fixed time each, from the committed seeds plus
# a local working corpus (fuzz/corpus/<target>, git-ignored), and prints libFuzzer's final
# stats. Usage (from the repo root or fuzz/):
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# Defaults: 300 s, all five targets. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pickle torchzip legacy safetensors_header open_and_plan)
export RUSTC_BOOTSTRAP=1  # cargo fuzz needs nightly flags; stable works with this
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "=== $t: ${secs}s"
    cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=5 \
        -max_len=16384 -print_final_stats=1 2>&1 | tee "fuzz/target/$t.log" |
        grep -E "^(#[0-9]+ +DONE|stat::|==[0-9]+==|SUMMARY|Done|INFO: seed)|panicked|ERROR" || true
done
