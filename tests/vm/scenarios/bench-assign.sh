#!/usr/bin/env bash
# Benchmark (issue 3): move 7 functions (igb VFs, each bound to igbvf) to vfio-pci with
# passthroughctl vs a bare shell loop of the same sysfs writes (the floor) vs dpdk-devbind.py vs
# driverctl, in the same guest and run. Prints medians and ratios; the checks only assert that
# each method really bound all 7 (timings are reported, not asserted).
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
ROUNDS="${PT_BENCH_ROUNDS:-5}"

pf="$(find_dev 0x8086 0x10c9)"
modprobe igbvf
echo 7 > "$SYS/$pf/sriov_numvfs"
check vfs-appear wait_for "[ -e $SYS/$pf/virtfn6/driver ]" 30
VFS=()
for i in 0 1 2 3 4 5 6; do VFS+=("$(basename "$(readlink "$SYS/$pf/virtfn$i")")"); done
modprobe vfio-pci
start_system_bus
check daemon-starts start_daemon

all_on() { local a; for a in "${VFS[@]}"; do [ "$(driver_of "$a")" = "$1" ] || return 1; done; }
restore() { local a; for a in "${VFS[@]}"; do raw_release "$a"; done; all_on igbvf; }

bare() {
    local a
    for a in "${VFS[@]}"; do
        echo vfio-pci > "$SYS/$a/driver_override"
        echo "$a" > "$SYS/$a/driver/unbind"
        echo "$a" > /sys/bus/pci/drivers_probe
    done
}
ours() { "$CTL" assign --runtime "${VFS[@]}" >/dev/null; }
ours_restore() { "$CTL" release --runtime "${VFS[@]}" >/dev/null; all_on igbvf; }
dpdk() { dpdk-devbind.py -b vfio-pci "${VFS[@]}" >/dev/null 2>&1; }
dctl() { local a; for a in "${VFS[@]}"; do driverctl --nosave set-override "$a" vfio-pci >/dev/null 2>&1; done; }
dctl_restore() { local a; for a in "${VFS[@]}"; do driverctl --nosave unset-override "$a" >/dev/null 2>&1; done; restore; }

# measure NAME RUN RESTORE: times RUN $ROUNDS times after an untimed warm-up round, restoring
# and letting udev settle between rounds.
declare -A MEDIAN
measure() {
    local name="$1" run="$2" undo="$3" i t0 t1 times=()
    # One untimed round first: the first use of every method pays for cold caches (the
    # daemon's first request, python's first import of the script), which is not what we compare.
    quiesce; $run; $undo || { note "$name: restore after the warm-up round failed"; return; }
    for i in $(seq "$ROUNDS"); do
        quiesce
        t0=$(date +%s%N); $run; t1=$(date +%s%N)
        all_on vfio-pci || { expect_eq "$name-binds-all-7" "$(for a in "${VFS[@]}"; do driver_of "$a"; done | sort | uniq -c | tr '\n' ' ')" "7 vfio-pci"; $undo; return; }
        times+=($(( (t1 - t0) / 1000 )))
        $undo || { note "$name: restore failed"; return; }
    done
    MEDIAN[$name]=$(median "${times[@]}")
    expect_eq "$name-binds-all-7" ok ok
    note "$name: median $((MEDIAN[$name] / 1000)) ms over $ROUNDS rounds (all: $(printf '%s ' "${times[@]}")us)"
}

check restore-baseline all_on igbvf
measure bare-loop bare restore
measure passthroughctl ours ours_restore
measure dpdk-devbind dpdk restore
measure driverctl dctl dctl_restore

{
    echo "assign 7 VFs to vfio-pci (median of $ROUNDS, guest under TCG):"
    for m in bare-loop passthroughctl dpdk-devbind driverctl; do
        [ -n "${MEDIAN[$m]:-}" ] && printf '  %-15s %8.1f ms\n' "$m" "$(awk -v u="${MEDIAN[$m]}" 'BEGIN{print u/1000}')"
    done
    echo "  passthroughctl / bare loop:    $(ratio "${MEDIAN[passthroughctl]:-0}" "${MEDIAN[bare-loop]:-0}")x (target <= 1.2)"
    echo "  dpdk-devbind / passthroughctl: $(ratio "${MEDIAN[dpdk-devbind]:-0}" "${MEDIAN[passthroughctl]:-0}")x (target >= 5)"
    echo "  driverctl / passthroughctl:    $(ratio "${MEDIAN[driverctl]:-0}" "${MEDIAN[passthroughctl]:-0}")x (target >= 5)"
} | tee "$PT_OUT/bench-assign.txt"
stop_daemon
finish
