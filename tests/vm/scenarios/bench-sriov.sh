#!/usr/bin/env bash
# Benchmark (issue 4): 7 igb VFs created and bound to vfio-pci with
#   passthroughctl vf create PF --count 7 --assign --runtime
# vs the naive bare sequence users write today (numvfs=7 with autoprobe on, so igbvf binds each
# VF, then override/unbind/probe each) vs the best bare sequence (autoprobe off, numvfs=7,
# override/probe each, autoprobe back on). Median of $PT_BENCH_ROUNDS (5) rounds each, a reset to
# 0 VFs between rounds; prints medians and ratios to $PT_OUT/bench-sriov.txt. The checks only
# assert that each method really bound all 7 (timings are reported, not asserted).
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
ROUNDS="${PT_BENCH_ROUNDS:-5}"

pf="$(find_dev 0x8086 0x10c9)"
P="$SYS/$pf"
modprobe igbvf
modprobe vfio-pci
start_system_bus
# Started in this shell, not inside `check` (a subshell), so stop_daemon knows its pid.
start_daemon
check daemon-starts "$CTL" status

vfs() { local i; for i in 0 1 2 3 4 5 6; do basename "$(readlink "$P/virtfn$i")"; done; }
all_on_vfio() {
    [ "$(cat "$P/sriov_numvfs")" = 7 ] || return 1
    local a; for a in $(vfs); do [ "$(driver_of "$a")" = vfio-pci ] || return 1; done
}
reset() { echo 0 > "$P/sriov_numvfs" && echo 1 > "$P/sriov_drivers_autoprobe"; }

naive() {
    local a
    echo 7 > "$P/sriov_numvfs"
    for a in $(vfs); do
        echo vfio-pci > "$SYS/$a/driver_override"
        [ -e "$SYS/$a/driver" ] && echo "$a" > "$SYS/$a/driver/unbind"
        echo "$a" > /sys/bus/pci/drivers_probe
    done
}
best() {
    local a
    echo 0 > "$P/sriov_drivers_autoprobe"
    echo 7 > "$P/sriov_numvfs"
    for a in $(vfs); do
        echo vfio-pci > "$SYS/$a/driver_override"
        echo "$a" > /sys/bus/pci/drivers_probe
    done
    echo 1 > "$P/sriov_drivers_autoprobe"
}
ours() { "$CTL" vf create "$pf" --count 7 --assign --runtime >/dev/null; }

declare -A MEDIAN
measure() {
    local name="$1" run="$2" i t0 t1 times=()
    # One untimed round first (cold caches: the daemon's first create), as in bench-assign.sh.
    reset; quiesce; $run
    for i in $(seq "$ROUNDS"); do
        reset
        quiesce
        t0=$(date +%s%N); $run; t1=$(date +%s%N)
        if ! all_on_vfio; then
            expect_eq "$name-binds-all-7" "$(for a in $(vfs); do driver_of "$a"; done | sort | uniq -c | tr '\n' ' ')" "7 vfio-pci"
            reset; return
        fi
        times+=($(( (t1 - t0) / 1000 )))
    done
    reset
    MEDIAN[$name]=$(median "${times[@]}")
    expect_eq "$name-binds-all-7" ok ok
    note "$name: median $((MEDIAN[$name] / 1000)) ms over $ROUNDS rounds (all: $(printf '%s ' "${times[@]}")us)"
}

measure naive naive
measure best best
measure passthroughctl ours
expect_eq autoprobe-restored "$(cat "$P/sriov_drivers_autoprobe")" 1

{
    echo "create 7 igb VFs on vfio-pci (median of $ROUNDS, guest under TCG):"
    for m in naive best passthroughctl; do
        [ -n "${MEDIAN[$m]:-}" ] && printf '  %-15s %8.1f ms\n' "$m" "$(awk -v u="${MEDIAN[$m]}" 'BEGIN{print u/1000}')"
    done
    echo "  passthroughctl / best bare: $(ratio "${MEDIAN[passthroughctl]:-0}" "${MEDIAN[best]:-0}")x (target <= 1.2)"
    echo "  naive bare / passthroughctl: $(ratio "${MEDIAN[naive]:-0}" "${MEDIAN[passthroughctl]:-0}")x (target > 1)"
} | tee "$PT_OUT/bench-sriov.txt"
stop_daemon
finish
