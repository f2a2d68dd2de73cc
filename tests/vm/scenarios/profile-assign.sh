#!/usr/bin/env bash
# Profiling aid (not part of make test): where an assign of 7 VFs spends its time. Prints the
# process-start and round-trip floors, bare loop vs passthroughctl per round, and the daemon's
# per-phase `timing` lines (debug level).
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
pf="$(find_dev 0x8086 0x10c9)"
modprobe igbvf
echo 7 > "$SYS/$pf/sriov_numvfs"
wait_for "[ -e $SYS/$pf/virtfn6/driver ]" 30
VFS=()
for i in 0 1 2 3 4 5 6; do VFS+=("$(basename "$(readlink "$SYS/$pf/virtfn$i")")"); done
modprobe vfio-pci
start_system_bus
export RUST_LOG=passthroughd=debug
start_daemon
check daemon-starts "$CTL" status
ms() { echo $(( ($2 - $1) / 1000000 )); }
for i in 1 2 3 4 5; do t0=$(date +%s%N); "$CTL" status >/dev/null; t1=$(date +%s%N); note "status $(ms $t0 $t1) ms"; done
for i in 1 2 3; do t0=$(date +%s%N); "$CTL" --help >/dev/null; t1=$(date +%s%N); note "ctl --help $(ms $t0 $t1) ms"; done
for i in 1 2 3; do t0=$(date +%s%N); /bin/true; t1=$(date +%s%N); note "true $(ms $t0 $t1) ms"; done
for r in 1 2 3 4 5; do
  quiesce
  t0=$(date +%s%N)
  for a in "${VFS[@]}"; do
    echo vfio-pci > "$SYS/$a/driver_override"
    echo "$a" > "$SYS/$a/driver/unbind"
    echo "$a" > /sys/bus/pci/drivers_probe
  done
  t1=$(date +%s%N); note "bare $(ms $t0 $t1) ms"
  for a in "${VFS[@]}"; do raw_release "$a"; done
  quiesce
  t0=$(date +%s%N); "$CTL" assign --runtime "${VFS[@]}" >/dev/null; t1=$(date +%s%N); note "ours $(ms $t0 $t1) ms"
  t0=$(date +%s%N); "$CTL" assign --runtime "${VFS[@]}" >/dev/null; t1=$(date +%s%N); note "ours again (no-op) $(ms $t0 $t1) ms"
  t0=$(date +%s%N); "$CTL" status >/dev/null; t1=$(date +%s%N); note "status $(ms $t0 $t1) ms"
  "$CTL" release --runtime "${VFS[@]}" >/dev/null
done
grep -E "timing" "$PT_OUT/daemon.log" | tail -12 | sed 's/^/  /' >> "$PT_RESULTS"
stop_daemon
finish
