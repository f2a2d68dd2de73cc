#!/usr/bin/env bash
# Scenario (issue 11): hotplug and early boot on a real kernel with udevd. With the config
#   [[device]] match = the igb VF ids        [[device]] address = the second igb PF
# and the shipped udev rule installed:
# - VFs made by a plain `echo N > sriov_numvfs` end on vfio-pci without any request, also when
#   the daemon is killed in the middle of the claim (the next start finishes it);
# - the configured PF removed and rescanned with igb loaded ends on vfio-pci (igb probes it
#   once: the PCI core binds a loaded driver before udev runs; the count is reported);
# - with igb not loaded when the PF appears (unload, remove, rescan: udev loads igb), igb never
#   probes it (zero probes, asserted): the rule set driver_override first;
# - a persistent assignment whose device is removed and comes back is re-applied;
# - an unconfigured device that appears is left alone;
# - without udevd the daemon follows the kernel's uevents and still claims new VFs.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

igbs=()
for d in "$SYS"/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10c9 ] && igbs+=("$(basename "$d")")
done
pf0="${igbs[0]:-}"; pf1="${igbs[1]:-}"
e1000e="$(find_dev 0x8086 0x10d3)"
pcnet="$(find_dev 0x1022 0x2000)"
check two-igb-pfs test -n "$pf0" -a -n "$pf1"
modprobe vfio-pci
modprobe igbvf

# The shipped rule, pointing at the binary under test.
mkdir -p /etc/udev/rules.d /etc/passthroughd
sed "s|/usr/bin/passthroughd|$PTD --state-dir $STATE_DIR|" "$PT_REPO/systemd/70-passthroughd.rules" \
    > /etc/udev/rules.d/70-passthroughd.rules
udevadm control --reload
cat > /etc/passthroughd/config.toml <<EOF
version = 1

[[device]]
match = { vendor = "0x8086", device = "0x10ca" }

[[device]]
address = "$pf1"
EOF
start_system_bus
start_daemon
check daemon-starts "$CTL" status
expect_eq configured-pf-on-vfio-at-start "$(driver_of "$pf1")" vfio-pci
check follows-udev grep -q "following device events.*udev" "$PT_OUT/daemon.log"

vfs_of() { local i; for ((i = 0; i < $2; i++)); do basename "$(readlink "$SYS/$1/virtfn$i")"; done; }
all_on() { local a; for a in $2; do [ "$(driver_of "$a")" = "$1" ] || return 1; done; }
igb_probes() { dmesg | tail -n +"$2" | grep -c "igb $1: Intel(R) Gigabit Ethernet Network Connection"; }

# VFs made outside the daemon: claimed by the match rule.
t0=$(date +%s%N)
echo 2 > "$SYS/$pf0/sriov_numvfs"
vfs="$(vfs_of "$pf0" 2)"
check echoed-vfs-claimed wait_for 'all_on vfio-pci "$vfs"' 30
t1=$(date +%s%N)
note "VFs from echo 2 > sriov_numvfs to both on vfio-pci: $(( (t1 - t0) / 1000000 )) ms"
exit_is status-hotplug 0 "$CTL" status
check status-shows-hotplug grep -q "hotplug: .* appeared: claimed" "$PT_OUT/last.out"
echo 0 > "$SYS/$pf0/sriov_numvfs"

# The daemon killed in the middle of a claim: strace delivers SIGKILL at its write to
# drivers_probe, after it unbound a new VF from igbvf. The next start finishes the journaled
# claim; nothing stays without a driver.
stop_daemon
start_daemon strace -f -qq -o /dev/null -P /sys/bus/pci/drivers_probe \
    -e trace=write -e inject=write:error=EIO:signal=KILL
check daemon-starts-under-strace "$CTL" status
echo 2 > "$SYS/$pf0/sriov_numvfs"
vfs="$(vfs_of "$pf0" 2)"
check claim-killed daemon_gone 30
rm -f "$DAEMON_PIDFILE"
note "VF drivers after the kill: $(for a in $vfs; do driver_of "$a"; done | tr '\n' ' ')"
check claim-killed-after-unbind sh -c "for a in $(echo $vfs); do [ -e $SYS/\$a/driver ] || exit 0; done; exit 1"
check claim-journal-left sh -c "ls '$STATE_DIR' | grep -q '^journal-'"
check claim-recovers start_daemon
check claim-finished-after-restart wait_for 'all_on vfio-pci "$vfs"' 30
check claim-journal-done sh -c "! ls '$STATE_DIR' | grep -q '^journal-'"
echo 0 > "$SYS/$pf0/sriov_numvfs"

# The configured PF removed and rescanned while igb is loaded.
mark="$(dmesg | wc -l)"
echo 1 > "$SYS/$pf1/remove"
check pf-removed wait_for "[ ! -e $SYS/$pf1 ]" 10
echo 1 > /sys/bus/pci/rescan
check pf-back-on-vfio wait_for '[ "$(driver_of "$pf1")" = vfio-pci ]' 30
note "igb probes of $pf1 with igb loaded when it appeared: $(igb_probes "$pf1" "$mark")"

# The same with igb not loaded when it appears: udev loads igb, which never probes the PF.
mark="$(dmesg | wc -l)"
echo 1 > "$SYS/$pf1/remove"
check pf-removed-again wait_for "[ ! -e $SYS/$pf1 ]" 10
rmmod igb
check igb-unloaded wait_for "[ ! -d /sys/module/igb ]" 10
echo 1 > /sys/bus/pci/rescan
check igb-loaded-by-udev wait_for "[ -d /sys/module/igb ]" 30
check pf-on-vfio-without-igb wait_for '[ "$(driver_of "$pf1")" = vfio-pci ]' 30
probes="$(igb_probes "$pf1" "$mark")"
note "igb probes of $pf1 with igb not loaded when it appeared: $probes"
expect_eq igb-never-probed-the-claimed-pf "$probes" 0
check other-pf-back-on-igb wait_for '[ "$(driver_of "$pf0")" = igb ]' 30

# A persistent assignment whose device goes and comes back.
exit_is assign-e1000e 0 "$CTL" assign "$e1000e"
echo 1 > "$SYS/$e1000e/remove"
check e1000e-removed wait_for "[ ! -e $SYS/$e1000e ]" 10
exit_is status-absent 0 "$CTL" --json status
expect_eq assignment-shown-absent "$(jq -r --arg a "$e1000e" '.assignments[] | select(.address == $a) | .state' "$PT_OUT/last.out" | cut -d: -f1)" absent
echo 1 > /sys/bus/pci/rescan
check assignment-reapplied wait_for '[ "$(driver_of "$e1000e")" = vfio-pci ]' 30
exit_is release-e1000e 0 "$CTL" release "$e1000e"

# An unconfigured device that appears is left alone.
echo 1 > "$SYS/$pcnet/remove"
check pcnet-removed wait_for "[ ! -e $SYS/$pcnet ]" 10
echo 1 > /sys/bus/pci/rescan
check pcnet-back wait_for '[ -e "$SYS/$pcnet/driver" ]' 30
sleep 1
expect_eq unconfigured-left-alone "$(driver_of "$pcnet") $(cat "$SYS/$pcnet/driver_override")" "pcnet32 (null)"

# Without udevd: the kernel's uevents, the same claim.
stop_daemon
# As a host without udevd, or one whose udevd died: its control socket file stays behind.
udevadm control --exit 2>/dev/null
pkill -x systemd-udevd 2>/dev/null; pkill -x udevd 2>/dev/null
# The guest's init does not reap, so a killed udevd can linger as a zombie: count the living.
udevd_alive() { local p; for p in $(pgrep -x systemd-udevd; pgrep -x udevd); do alive "$p" && return 0; done; return 1; }
check udevd-gone wait_for "! udevd_alive" 10
note "udevd's control socket after it went: $(ls -l /run/udev/control 2>&1 | tr '\n' ' ')"
start_daemon
check daemon-restarts-without-udevd "$CTL" status
check follows-kernel-uevents grep -q "following device events.*kernel uevents" "$PT_OUT/daemon.log"
echo 2 > "$SYS/$pf0/sriov_numvfs"
vfs="$(vfs_of "$pf0" 2)"
check echoed-vfs-claimed-without-udevd wait_for 'all_on vfio-pci "$vfs"' 30
echo 0 > "$SYS/$pf0/sriov_numvfs"
stop_daemon
rm -f /etc/udev/rules.d/70-passthroughd.rules /etc/passthroughd/config.toml
finish
