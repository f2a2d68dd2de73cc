#!/usr/bin/env bash
# Benchmark (issue 10): boot apply. The daemon starts with a config of every igb PF x 7 assigned
# VFs and two device entries (the e1000e, and the e1000 with its IOMMU group), timed from process
# start until the kernel shows everything on vfio-pci, vs the best bare shell sequence doing the
# same writes (per PF: autoprobe off, numvfs=7, override + probe per VF, autoprobe on; per device:
# override, unbind, probe). Median of $PT_BENCH_ROUNDS (5) rounds each after one untimed round, a
# reset (no VFs, host drivers, empty state) and a udev settle before every round. Prints the table
# to $PT_OUT/bench-apply.txt; the checks only assert that each method really reached the end state.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
ROUNDS="${PT_BENCH_ROUNDS:-5}"

pfs=()
for d in "$SYS"/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10c9 ] && pfs+=("$(basename "$d")")
done
e1000e="$(find_dev 0x8086 0x10d3)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
devices=("$e1000e" "$e1000" "$pcnet")
check pfs-found test "${#pfs[@]}" -ge 1
expected=$(( ${#pfs[@]} * 7 + ${#devices[@]} ))
note "${#pfs[@]} igb PFs x 7 VFs + ${#devices[@]} device functions = $expected functions"
modprobe igbvf
modprobe vfio-pci
VFIO=/sys/bus/pci/drivers/vfio-pci

mkdir -p /etc/passthroughd
{
    echo "version = 1"
    for pf in "${pfs[@]}"; do printf '\n[[sriov]]\npf = "%s"\ncount = 7\nassign = "all"\n' "$pf"; done
    printf '\n[[device]]\naddress = "%s"\n\n[[device]]\naddress = "%s"\ngroup = true\n' "$e1000e" "$e1000"
} > /etc/passthroughd/bench.toml

# Everything that counts is on vfio-pci: a bash glob, no process per check.
applied() { local bound=("$VFIO"/0000:*); [ -e "${bound[0]}" ] && [ "${#bound[@]}" -eq "$expected" ]; }
reset() {
    local pf d
    for pf in "${pfs[@]}"; do
        echo 0 > "$SYS/$pf/sriov_numvfs"
        echo 1 > "$SYS/$pf/sriov_drivers_autoprobe"
    done
    for d in "${devices[@]}"; do raw_release "$d"; done
    rm -rf "$STATE_DIR"
}

bare() {
    local pf a i d
    for pf in "${pfs[@]}"; do
        echo 0 > "$SYS/$pf/sriov_drivers_autoprobe"
        echo 7 > "$SYS/$pf/sriov_numvfs"
        for i in 0 1 2 3 4 5 6; do
            a="$(basename "$(readlink "$SYS/$pf/virtfn$i")")"
            echo vfio-pci > "$SYS/$a/driver_override"
            echo "$a" > /sys/bus/pci/drivers_probe
        done
        echo 1 > "$SYS/$pf/sriov_drivers_autoprobe"
    done
    for d in "${devices[@]}"; do
        echo vfio-pci > "$SYS/$d/driver_override"
        echo "$d" > "$SYS/$d/driver/unbind"
        echo "$d" > /sys/bus/pci/drivers_probe
    done
}
# The daemon from process start until the kernel shows the end state; it is stopped after.
ours() {
    "$PT_BIN/passthroughd" --bus system --state-dir "$STATE_DIR" --config /etc/passthroughd/bench.toml \
        > >(exec cat >>"$PT_OUT/daemon.log" 2>/dev/null) 2>&1 &
    echo $! > "$DAEMON_PIDFILE"
    while ! applied; do :; done
}

start_system_bus
declare -A MEDIAN
measure() {
    local name="$1" run="$2" i t0 t1 times=()
    reset; quiesce; $run; stop_daemon
    for i in $(seq "$ROUNDS"); do
        reset
        quiesce
        t0=$(date +%s%N); $run; t1=$(date +%s%N)
        if ! applied; then
            expect_eq "$name-applies-all" "$(ls "$VFIO" | grep -c :)" "$expected"
            stop_daemon; reset; return
        fi
        times+=($(( (t1 - t0) / 1000 )))
        stop_daemon
    done
    reset
    MEDIAN[$name]=$(median "${times[@]}")
    expect_eq "$name-applies-all" ok ok
    note "$name: median $((MEDIAN[$name] / 1000)) ms over $ROUNDS rounds (all: $(printf '%s ' "${times[@]}")us)"
}

measure bare bare
measure passthroughd ours
for pf in "${pfs[@]}"; do expect_eq "autoprobe-restored-$pf" "$(cat "$SYS/$pf/sriov_drivers_autoprobe")" 1; done

{
    echo "boot apply: ${#pfs[@]} PF(s) x 7 assigned VFs + ${#devices[@]} device functions (median of $ROUNDS, guest under TCG):"
    for m in bare passthroughd; do
        [ -n "${MEDIAN[$m]:-}" ] && printf '  %-22s %8.1f ms\n' "$m" "$(awk -v u="${MEDIAN[$m]}" 'BEGIN{print u/1000}')"
    done
    echo "  passthroughd (process start to all applied) / best bare sequence: $(ratio "${MEDIAN[passthroughd]:-0}" "${MEDIAN[bare]:-0}")x (target <= 1.3)"
} | tee "$PT_OUT/bench-apply.txt"
rm -f /etc/passthroughd/bench.toml
finish
