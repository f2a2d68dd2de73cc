#!/usr/bin/env bash
# Scenario (issue 3): assign and release through D-Bus on a real kernel, with the safety rules,
# persistence, crash recovery and authorization.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

pf="$(find_dev 0x8086 0x10c9)"
e1000e="$(find_dev 0x8086 0x10d3)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
bridge="$(basename "$(dirname "$(readlink -f "$SYS/$e1000")")")"
route_if="$(ip route show default | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)"
# The PCI function under a class device: the innermost address in its resolved sysfs path (a
# virtio NIC's or disk's `device` is the virtioN device, whose parent is the function).
pci_of() { readlink -f "$1" | grep -o '[0-9a-f]\{4\}:[0-9a-f]\{2\}:[0-9a-f]\{2\}\.[0-7]' | tail -n1; }
route_nic="$(pci_of "/sys/class/net/$route_if")"
disk="$(pci_of /sys/block/vda)"
note "igb $pf, e1000e $e1000e, bridged $e1000 + $pcnet behind $bridge, default route $route_if on $route_nic, disk vda on $disk"
check all-devices-found test -n "$pf" -a -n "$e1000e" -a -n "$e1000" -a -n "$pcnet" -a -n "$route_nic" -a -n "$disk"

start_system_bus
check daemon-starts start_daemon
expect_eq list-json-covers-every-function "$("$CTL" --json list | jq length)" "$(ls $SYS | wc -l)"

# Assign and release restore the original driver.
for dev in "$e1000e" "$pf"; do
    orig="$(driver_of "$dev")"
    exit_is "assign-$dev" 0 "$CTL" assign "$dev"
    expect_eq "assign-$dev-on-vfio" "$(driver_of "$dev")" vfio-pci
    check "assign-$dev-shown" sh -c "'$CTL' --json show $dev | grep -q vfio-pci"
    exit_is "release-$dev" 0 "$CTL" release "$dev"
    expect_eq "release-$dev-restores-$orig" "$(driver_of "$dev")" "$orig"
    expect_eq "release-$dev-clears-override" "$(cat "$SYS/$dev/driver_override")" "(null)"
done

# One member of a shared group alone is refused, naming the other member; --group takes both.
exit_is group-member-alone-refused 5 "$CTL" assign "$e1000"
check group-refusal-names-other-member grep -q "$pcnet" "$PT_OUT/last.err"
expect_eq group-refusal-changes-nothing "$(driver_of "$e1000") $(driver_of "$pcnet")" "e1000 pcnet32"
exit_is group-assign 0 "$CTL" assign --group "$e1000"
expect_eq group-assign-both-on-vfio "$(driver_of "$e1000") $(driver_of "$pcnet")" "vfio-pci vfio-pci"
expect_eq group-assign-skips-bridge "$(driver_of "$bridge")" -
exit_is group-release 0 "$CTL" release "$e1000" "$pcnet"
expect_eq group-release-restores "$(driver_of "$e1000") $(driver_of "$pcnet")" "e1000 pcnet32"

# The NIC that carries the default route is refused (not forced here: it is the guest's link).
exit_is default-route-nic-refused 5 "$CTL" assign "$route_nic"
check default-route-reason grep -qi "route" "$PT_OUT/last.err"
expect_eq default-route-nic-untouched "$(driver_of "$route_nic")" virtio-pci

# The disk holding a mounted filesystem is refused, even with --force.
# /tmp is one of the guest's writable directories (the host's / is read-only there).
mkdir -p /tmp/ptdisk && mkfs.ext4 -q -F /dev/vda && mount /dev/vda /tmp/ptdisk
check disk-mounted mountpoint -q /tmp/ptdisk
exit_is mounted-disk-refused 5 "$CTL" assign "$disk"
check mounted-disk-reason grep -qi "mount" "$PT_OUT/last.err"
exit_is mounted-disk-refused-with-force 5 "$CTL" assign --force "$disk"
expect_eq mounted-disk-untouched "$(driver_of "$disk")" virtio-pci
umount /tmp/ptdisk

# Bad inputs get their exit codes and change nothing.
before="$(kernel_functions)"
exit_is bad-address 2 "$CTL" assign 0000:02:00.9
exit_is unknown-device 4 "$CTL" assign 0000:09:00.0
exit_is bridge-refused 5 "$CTL" assign 0000:00:10.0
exit_is no-address 2 "$CTL" assign
exit_is unknown-option 2 "$CTL" assign --bogus "$e1000e"
check bad-inputs-change-nothing diff <(echo "$before") <(kernel_functions)

# An unprivileged caller may read but not assign (no polkit agent here: fail closed).
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
exit_is unprivileged-list-allowed 0 nobody "$CTL" list
exit_is unprivileged-assign-denied 3 nobody "$CTL" assign "$e1000e"
expect_eq unprivileged-changes-nothing "$(driver_of "$e1000e")" e1000e
# Only root may own the service name (the bus policy): an unprivileged passthroughd, with a state
# dir of its own so nothing else stops it first, is refused by the bus and exits 69.
mkdir -p /tmp/nobody-state && chown 65534:65534 /tmp/nobody-state
exit_is unprivileged-cannot-own-the-name 69 timeout 60 setpriv --reuid=65534 --regid=65534 \
    --clear-groups "$PTD" --bus system --state-dir /tmp/nobody-state
check unprivileged-owner-refused-by-policy grep -q "not allowed to own the service" "$PT_OUT/last.err"
check root-daemon-still-serves "$CTL" status

# Persistent assignments survive a restart and a "reboot" (device back on its host driver).
exit_is persist-assign 0 "$CTL" assign "$e1000e"
check persist-state-file grep -q "$e1000e" "$STATE_DIR/state.toml"
stop_daemon
raw_release "$e1000e"
expect_eq persist-host-driver-after-reboot "$(driver_of "$e1000e")" e1000e
check persist-daemon-restarts start_daemon
expect_eq persist-reapplied "$(driver_of "$e1000e")" vfio-pci
check persist-in-status sh -c "'$CTL' --json status | jq -e '.assignments[] | select(.address==\"$e1000e\")'"
exit_is persist-release 0 "$CTL" release "$e1000e"
check persist-release-forgets sh -c "! grep -q '$e1000e' '$STATE_DIR/state.toml'"
expect_eq persist-release-restores "$(driver_of "$e1000e")" e1000e

# Killed between unbind and probe: strace delivers SIGKILL at the daemon's write to
# drivers_probe, after the unbind. The next start must finish (persistent) or roll back
# (runtime) the assignment: never a driverless device, and state.toml matching the kernel.
crash_assign() {  # crash_assign NAME [assign options]
    local name="$1"; shift
    stop_daemon
    start_daemon strace -f -qq -o /dev/null -P /sys/bus/pci/drivers_probe \
        -e trace=write -e inject=write:error=EIO:signal=KILL
    "$CTL" assign "$@" "$e1000e" >/dev/null 2>&1
    daemon_gone 10
    rm -f "$DAEMON_PIDFILE"
    expect_eq "$name-killed-after-unbind" "$(driver_of "$e1000e")" -
    check "$name-journal-left" sh -c "ls '$STATE_DIR' | grep -qv '^state.toml$'"
    check "$name-recovers" start_daemon
}
crash_assign crash-persistent
expect_eq crash-persistent-finished "$(driver_of "$e1000e")" vfio-pci
check crash-persistent-state-matches grep -q "$e1000e" "$STATE_DIR/state.toml"
exit_is crash-persistent-release 0 "$CTL" release "$e1000e"
crash_assign crash-runtime --runtime
expect_eq crash-runtime-rolled-back "$(driver_of "$e1000e")" e1000e
check crash-runtime-not-in-state sh -c "! grep -q '$e1000e' '$STATE_DIR/state.toml' 2>/dev/null"

stop_daemon
cp "$STATE_DIR"/state.toml "$PT_OUT/" 2>/dev/null

# Storage faults on a real filesystem: the state dir on a small tmpfs, full, then read-only. A
# request that cannot be recorded is refused with the kernel's reason and changes nothing; the
# stored state is kept as it was.
mount -t tmpfs -o size=256k,mode=0700 ptstate "$STATE_DIR"
check storage-daemon-starts start_daemon
exit_is storage-assign 0 "$CTL" assign "$e1000e"
cp "$STATE_DIR/state.toml" "$PT_OUT/state.good"
dd if=/dev/zero of="$STATE_DIR/fill" bs=4k >/dev/null 2>&1 # until the filesystem is full
exit_is disk-full-assign-refused 1 "$CTL" assign "$pf"
check disk-full-reason grep -q "No space left on device" "$PT_OUT/last.err"
expect_eq disk-full-assign-changes-nothing "$(driver_of "$pf")" igb
exit_is disk-full-release-refused 1 "$CTL" release "$e1000e"
expect_eq disk-full-release-keeps-assignment "$(driver_of "$e1000e")" vfio-pci
check disk-full-state-kept cmp "$STATE_DIR/state.toml" "$PT_OUT/state.good"
no_leftovers() { ! ls -A "$STATE_DIR" | grep -q -e '^journal-' -e '\.tmp$'; }
check disk-full-no-journal-left no_leftovers
rm -f "$STATE_DIR/fill"
mount -o remount,ro "$STATE_DIR"
exit_is read-only-assign-refused 1 "$CTL" assign "$pf"
check read-only-reason grep -q "Read-only file system" "$PT_OUT/last.err"
expect_eq read-only-changes-nothing "$(driver_of "$pf")" igb
check read-only-state-kept cmp "$STATE_DIR/state.toml" "$PT_OUT/state.good"
mount -o remount,rw "$STATE_DIR"
exit_is storage-back-assign 0 "$CTL" assign "$pf"
exit_is storage-back-release 0 "$CTL" release "$pf" "$e1000e"
expect_eq storage-back-restores "$(driver_of "$pf") $(driver_of "$e1000e")" "igb e1000e"
stop_daemon
umount "$STATE_DIR"
finish
