#!/usr/bin/env bash
# Benchmark: what users run by hand, against passthroughctl, in the same guest and run.
# - discovery: `passthroughctl --json list` vs `lspci -k` vs `dpdk-devbind.py --status` vs
#   `driverctl list-devices`;
# - assign of 7 functions (the VFs of one igb PF, each on igbvf) and of 14 (the VFs of two PFs,
#   when the host has two) to vfio-pci: passthroughctl vs a bare shell loop of the same sysfs
#   writes (the floor) vs dpdk-devbind.py vs driverctl;
# - the CLI's start (`passthroughctl --version`) and the daemon's resident memory when idle.
# Medians of $PT_BENCH_ROUNDS (5) after an untimed round; dpdk-devbind and driverctl, 5 to 30
# times slower, get $PT_BENCH_SLOW_ROUNDS (3) and, unless PT_BENCH_FULL=1 (make test-long), only
# the 7-function assign: that keeps this under 3 minutes in `make test`. The checks only assert
# that each method really did its work (timings are reported, not asserted). The table goes to
# bench-assign.txt.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
ROUNDS="${PT_BENCH_ROUNDS:-5}"
SLOW_ROUNDS="${PT_BENCH_SLOW_ROUNDS:-3}"

mapfile -t pfs < <(find_devs 0x8086 0x10c9)
check pfs-found test "${#pfs[@]}" -ge 1
modprobe igbvf
ALL_VFS=()
for pf in "${pfs[@]:0:2}"; do
    echo 7 > "$SYS/$pf/sriov_numvfs"
    check "vfs-appear-$pf" wait_for "[ -e $SYS/$pf/virtfn6/driver ]" 30
    for i in 0 1 2 3 4 5 6; do ALL_VFS+=("$(basename "$(readlink "$SYS/$pf/virtfn$i")")"); done
done
modprobe vfio-pci
start_system_bus
check daemon-starts start_daemon

VFS=()   # the functions the methods below move
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

declare -A MEDIAN
# time_runs NAME RUN [ROUNDS]: the median of $ROUNDS timed runs of RUN, after one untimed (cold caches: the
# daemon's first request, python's first import of a script are not what is compared).
time_runs() {
    local name="$1" run="$2" rounds="${3:-$ROUNDS}" i t0 t1 all=()
    $run
    for i in $(seq "$rounds"); do
        t0=$(date +%s%N); $run; t1=$(date +%s%N)
        all+=($(( (t1 - t0) / 1000 )))
    done
    MEDIAN[$name]=$(median "${all[@]}")
    note "$name: median $((MEDIAN[$name] / 1000)) ms over $rounds rounds (all: $(printf '%s ' "${all[@]}")us)"
}

# measure NAME RUN RESTORE [ROUNDS]: times RUN on the functions in VFS, restoring and letting udev settle
# between rounds.
measure() {
    local name="$1" run="$2" undo="$3" rounds="${4:-$ROUNDS}" n="${#VFS[@]}" i t0 t1 all=()
    quiesce; $run; $undo || { note "$name: restore after the warm-up round failed"; return; }
    for i in $(seq "$rounds"); do
        quiesce
        t0=$(date +%s%N); $run; t1=$(date +%s%N)
        if ! all_on vfio-pci; then
            expect_eq "$name-binds-all-$n" "$(for a in "${VFS[@]}"; do driver_of "$a"; done | sort | uniq -c | tr '\n' ' ')" "$n vfio-pci"
            $undo; return
        fi
        all+=($(( (t1 - t0) / 1000 )))
        $undo || { note "$name: restore failed"; return; }
    done
    MEDIAN[$name]=$(median "${all[@]}")
    expect_eq "$name-binds-all-$n" ok ok
    note "$name: median $((MEDIAN[$name] / 1000)) ms over $rounds rounds (all: $(printf '%s ' "${all[@]}")us)"
}

# Discovery: each lists every function with its driver.
functions_total=$(ls "$SYS" | grep -c :)
list_ours() { "$CTL" --json list >/dev/null; }
list_lspci() { lspci -k >/dev/null; }
list_dpdk() { dpdk-devbind.py --status >/dev/null 2>&1; }
list_dctl() { driverctl list-devices >/dev/null 2>&1; }
listed_all() { [ "$("$CTL" --json list | jq length)" = "$functions_total" ]; }
check list-lists-all listed_all
time_runs list-passthroughctl list_ours
time_runs list-lspci list_lspci
time_runs list-dpdk-devbind list_dpdk "$SLOW_ROUNDS"
time_runs list-driverctl list_dctl "$SLOW_ROUNDS"
version_ours() { "$CTL" --version >/dev/null; }
time_runs cli-start version_ours

all_vfs_on_igbvf() { VFS=("${ALL_VFS[@]}"); all_on igbvf; }
check restore-baseline all_vfs_on_igbvf
SIZES=(7)
[ "${#ALL_VFS[@]}" -ge 14 ] && SIZES+=(14)
for n in "${SIZES[@]}"; do
    VFS=("${ALL_VFS[@]:0:$n}")
    measure "bare-loop-$n" bare restore
    measure "passthroughctl-$n" ours ours_restore
    [ "$n" = 7 ] || [ "${PT_BENCH_FULL:-0}" = 1 ] || continue
    measure "dpdk-devbind-$n" dpdk restore "$SLOW_ROUNDS"
    measure "driverctl-$n" dctl dctl_restore "$SLOW_ROUNDS"
done
[ "${#ALL_VFS[@]}" -ge 14 ] || note "one igb PF: the 14-function rounds were skipped"

sleep 2   # idle: no request in flight
rss_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$(daemon_main_pid)/status")
check daemon-rss-read test -n "$rss_kib"

ms() { [ -n "${MEDIAN[$1]:-}" ] && awk -v u="${MEDIAN[$1]}" 'BEGIN{printf "%8.1f ms", u/1000}' || printf '%11s' n/a; }
{
    echo "passthroughctl vs the tools users run (median of $ROUNDS; dpdk-devbind, driverctl: of $SLOW_ROUNDS; guest under TCG, $(date -u +%F)):"
    echo "discovery of $functions_total functions with their drivers:"
    for m in passthroughctl lspci dpdk-devbind driverctl; do printf '  %-16s %s\n' "$m" "$(ms "list-$m")"; done
    echo "  lspci -k / passthroughctl --json list: $(ratio "${MEDIAN[list-lspci]:-0}" "${MEDIAN[list-passthroughctl]:-0}")x (target > 1)"
    for n in "${SIZES[@]}"; do
        echo "assign $n VFs to vfio-pci:"
        for m in bare-loop passthroughctl dpdk-devbind driverctl; do
            [ -n "${MEDIAN[$m-$n]:-}" ] && printf '  %-16s %s\n' "$m" "$(ms "$m-$n")"
        done
        echo "  passthroughctl / bare loop:    $(ratio "${MEDIAN[passthroughctl-$n]:-0}" "${MEDIAN[bare-loop-$n]:-0}")x (target <= 1.2)"
        for m in dpdk-devbind driverctl; do
            [ -n "${MEDIAN[$m-$n]:-}" ] && printf '  %-31s%sx (target >= 5)\n' "$m / passthroughctl:" \
                "$(ratio "${MEDIAN[$m-$n]}" "${MEDIAN[passthroughctl-$n]:-0}")"
        done
    done
    echo "passthroughctl --version (CLI start): $(ms cli-start)"
    echo "daemon resident memory, idle after the runs: $(awk -v k="$rss_kib" 'BEGIN{printf "%.1f", k/1024}') MiB (target < 15)"
} | tee "$PT_OUT/bench-assign.txt"
stop_daemon
finish
