#!/usr/bin/env bash
# Runs rollbox's fuzz targets (fuzz/, cargo-fuzz on the nightly toolchain), one at a time,
# each for SECONDS seconds, at the lowest CPU priority. Installs cargo-fuzz if it is missing.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS  how long each target runs (default 600: the 10 minutes docs/security.md records)
#   TARGET   code_blocks, compaction, server_requests, guest_report (default: all four)
#
# Each target's corpus grows under fuzz/corpus/TARGET and a crash is written to
# fuzz/artifacts/TARGET; libFuzzer's last status line (runs, coverage) is printed per target.
# The compaction target counts with the test tokenizer: scripts/fetch-tokenizer.sh first.
set -euo pipefail

readonly ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly SECONDS_EACH="${1:-600}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=(code_blocks compaction server_requests guest_report)
fi

if ! cargo +nightly --version > /dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is missing; install it with: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version > /dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$ROOT/fuzz"
# Start from rollbox's own lock file, so the targets fuzz the dependency versions rollbox ships.
if [ ! -f Cargo.lock ]; then
    cp ../Cargo.lock Cargo.lock
fi
for target in "${TARGETS[@]}"; do
    mkdir -p "corpus/$target"
    echo "fuzz.sh: $target for ${SECONDS_EACH}s"
    log="$(mktemp)"
    # -max_total_time ends the run; a crash ends it early with a non-zero status.
    if nice -n 19 cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 > "$log" 2>&1; then
        status=ok
    else
        status=failed
    fi
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
    grep -E 'Done [0-9]+ runs|SUMMARY|panicked' "$log" || true
    echo "fuzz.sh: $target $status (log: $log)"
done
