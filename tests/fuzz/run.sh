#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes outside input, with AFL++ (cargo-afl, on the
# stable toolchain): tests/fuzz/run.sh [SECONDS-PER-TARGET] [TARGET...]
#
# The targets are in testkit/src/fuzz.rs, their AFL++ entry points in fuzz/. Each starts from
# tests/fuzz/TARGET/ (seeds, and every input that ever crashed it) and runs for SECONDS (default
# 20). A crash is copied into tests/fuzz/TARGET/crash-* (commit it: the ordinary test suite
# replays it, daemon/tests/integration/fuzz_replay.rs) and fails the run. Prints one line per
# target: executions, corpus, crashes, hangs. PT_FUZZ_OUT (default .fuzz-out) keeps AFL++'s
# output; PT_FUZZ_CLEAN=1 deletes the instrumented build afterwards (CI's disk).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SECS="${1:-20}"
shift || true
TARGETS=("$@")
[ "${#TARGETS[@]}" -gt 0 ] || TARGETS=(address config state journal domain_xml sysfs)
OUT="${PT_FUZZ_OUT:-$REPO/.fuzz-out}"
AFL_VERSION=0.18.2

if ! cargo afl --version 2>/dev/null | grep -q "$AFL_VERSION"; then
    echo "fuzz: installing cargo-afl $AFL_VERSION (it builds its own AFL++)"
    cargo install --quiet --locked cargo-afl --version "$AFL_VERSION"
fi
# AFL++'s runtime for this rustc; an error only says it is there already.
cargo afl config --build >/dev/null 2>&1 || true

echo "fuzz: building the instrumented targets"
(cd "$REPO/fuzz" && cargo afl build --quiet --release --locked --bins)
BIN="$REPO/fuzz/target/release"

export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_FAST_CAL=1
# A core_pattern that pipes to a crash handler (systemd-coredump, apport) only delays crashes.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
# One AFL++ instance per core at a time (each is single-threaded): the same executions per
# target in half the time on two cores. PT_FUZZ_JOBS overrides.
JOBS="${PT_FUZZ_JOBS:-$(nproc)}"
fuzz_one() {
    rm -rf "${OUT:?}/$1" "$OUT/$1.failed"
    cargo afl fuzz -V "$SECS" -i "$REPO/tests/fuzz/$1" -o "$OUT/$1" "$BIN/$1" >"$OUT/$1.log" 2>&1 ||
        touch "$OUT/$1.failed"
}
mkdir -p "$OUT"
for t in "${TARGETS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    fuzz_one "$t" &
done
wait
failed=0
printf '%-11s %10s %9s %7s %7s %6s\n' target executions exec/s corpus crashes hangs
for t in "${TARGETS[@]}"; do
    if [ -e "$OUT/$t.failed" ]; then
        echo "fuzz: AFL++ failed on $t; the end of $OUT/$t.log:" >&2
        tail -n 20 "$OUT/$t.log" >&2
        exit 1
    fi
    stat() { sed -n "s/^$1 *: *//p" "$OUT/$t/default/fuzzer_stats"; }
    printf '%-11s %10s %9s %7s %7s %6s\n' "$t" "$(stat execs_done)" "$(stat execs_per_sec)" \
        "$(stat corpus_count)" "$(stat saved_crashes)" "$(stat saved_hangs)"
    for crash in "$OUT/$t"/default/crashes/id:*; do
        [ -e "$crash" ] || continue
        keep="$REPO/tests/fuzz/$t/crash-$(sha1sum "$crash" | cut -c1-12)"
        cp "$crash" "$keep"
        echo "fuzz: $t crashed on $keep:" >&2
        head -c 300 "$crash" | od -c | head -n 8 >&2
        failed=1
    done
done
if [ "${PT_FUZZ_CLEAN:-0}" = 1 ]; then
    rm -rf "$REPO/fuzz/target"
fi
if [ "$failed" = 1 ]; then
    echo "fuzz: crashes were found and kept under tests/fuzz/*/crash-*; replay one with" >&2
    echo "  cargo test -p passthroughd --test integration fuzz_replay" >&2
    exit 1
fi
