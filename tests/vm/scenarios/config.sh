#!/usr/bin/env bash
# Scenario (issue 10): the declarative config on a real kernel. A config with an [[sriov]] PF
# (count and assigned indexes) and a [[device]] with group = true is applied at daemon start;
# after the drivers are reset by hand and a restart killed in the middle of its apply, the next
# start reaches the same end state; apply
# --dry-run is then empty; an edit shows in --dry-run without changing anything, apply does it,
# a second apply does nothing; a broken edit plus reload keeps the last good config and status
# shows the line; an entry removed and applied is released to its host driver.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

pf="$(find_dev 0x8086 0x10c9)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
e1000e="$(find_dev 0x8086 0x10d3)"
check devices-found test -n "$pf" -a -n "$e1000" -a -n "$pcnet" -a -n "$e1000e"
modprobe igbvf
modprobe vfio-pci
CONFIG=/etc/passthroughd/config.toml
mkdir -p /etc/passthroughd

write_config() {
    cat > "$CONFIG" <<EOF
version = 1

[[device]]
address = "$e1000"
group = true

[[sriov]]
pf = "$pf"
count = 3
assign = [0, 2]
$1
EOF
}
vf() { basename "$(readlink "$SYS/$pf/virtfn$1")"; }
end_state() {
    echo "$(driver_of "$e1000") $(driver_of "$pcnet") $(cat "$SYS/$pf/sriov_numvfs") \
$(driver_of "$(vf 0)") $(driver_of "$(vf 1)") $(driver_of "$(vf 2)")"
}
WANTED="vfio-pci vfio-pci 3 vfio-pci igbvf vfio-pci"
dmesg_before="$(dmesg | wc -l)"

write_config ""
start_system_bus
start_daemon
check daemon-starts "$CTL" status
expect_eq applied-at-start "$(end_state)" "$WANTED"
probed=0
for i in 0 2; do dmesg | tail -n +"$dmesg_before" | grep -q "igbvf $(vf $i)" && probed=$((probed + 1)); done
expect_eq assigned-vfs-never-met-igbvf "$probed" 0
check state-has-config-entries grep -q 'source = "config"' "$STATE_DIR/state.toml"
exit_is status-json 0 "$CTL" --json status
expect_eq status-config-entries "$(jq -r '.config.entries' "$PT_OUT/last.out")" 2
expect_eq status-sources "$(jq -r --arg a "$e1000" '.assignments[] | select(.address == $a) | .sources | join(",")' "$PT_OUT/last.out")" config

# As after a reboot: everything back on host drivers, no VFs; the restart applies it again.
stop_daemon
raw_release "$e1000"; raw_release "$pcnet"; echo 0 > "$SYS/$pf/sriov_numvfs"
expect_eq reset-by-hand "$(driver_of "$e1000") $(cat "$SYS/$pf/sriov_numvfs")" "e1000 0"
# This start is killed in the middle of its boot apply: strace delivers SIGKILL at the daemon's
# first write to drivers_probe (a VF made, or a device unbound, and not yet bound). The start
# after it finishes the journaled step and applies the rest: the same end state as ever.
start_daemon strace -f -qq -o /dev/null -P /sys/bus/pci/drivers_probe \
    -e trace=write -e inject=write:error=EIO:signal=KILL
check boot-apply-killed daemon_gone 30
rm -f "$DAEMON_PIDFILE"
check boot-apply-journal-left sh -c "ls '$STATE_DIR' | grep -q '^journal-'"
note "after the kill: $(end_state)"
check boot-apply-not-finished test "$(end_state)" != "$WANTED"
start_daemon
check daemon-restarts "$CTL" status
check boot-apply-journal-done sh -c "! ls '$STATE_DIR' | grep -q '^journal-'"
expect_eq same-end-state-after-restart "$(end_state)" "$WANTED"
exit_is dry-run-empty 0 "$CTL" apply --dry-run
check dry-run-says-nothing-to-do grep -q "nothing to do" "$PT_OUT/last.out"

# An edit: shown by --dry-run, changing nothing; apply does it; a second apply does nothing.
write_config "
[[device]]
address = \"$e1000e\""
exit_is reload-edit 0 "$CTL" reload
exit_is dry-run-edit 0 "$CTL" apply --dry-run
check dry-run-shows-edit grep -q "would move $e1000e: e1000e -> vfio-pci" "$PT_OUT/last.out"
expect_eq dry-run-changes-nothing "$(driver_of "$e1000e")" e1000e
exit_is apply-edit 0 "$CTL" apply
expect_eq apply-did-it "$(driver_of "$e1000e")" vfio-pci
exit_is apply-again 0 "$CTL" --json apply
expect_eq second-apply-nothing "$(jq -r '.changes | length' "$PT_OUT/last.out")" 0

# A broken edit: reload keeps the last good config and says where; status shows it.
write_config "
[[device]]
adress = \"$e1000e\""
exit_is reload-broken 2 "$CTL" reload
check reload-names-line grep -q "config.toml:13:1:" "$PT_OUT/last.err"
exit_is status-after-broken 0 "$CTL" status
check status-shows-config-error grep -q "config error: .*config.toml:13:1:" "$PT_OUT/last.out"
exit_is dry-run-still-last-good 0 "$CTL" apply --dry-run
check last-good-in-force grep -q "nothing to do" "$PT_OUT/last.out"
expect_eq broken-changes-nothing "$(driver_of "$e1000e")" vfio-pci

# The entry removed and applied: released to its host driver; the rest stays.
write_config ""
exit_is reload-removed 0 "$CTL" reload
exit_is apply-removed 0 "$CTL" apply
expect_eq removed-entry-released "$(driver_of "$e1000e")" e1000e
expect_eq rest-stays "$(end_state)" "$WANTED"

# Everything removed: the group back on its drivers, the VFs gone.
echo "version = 1" > "$CONFIG"
exit_is reload-empty 0 "$CTL" reload
exit_is apply-empty 0 "$CTL" apply
expect_eq all-released "$(driver_of "$e1000") $(driver_of "$pcnet") $(cat "$SYS/$pf/sriov_numvfs")" "e1000 pcnet32 0"
stop_daemon
rm -f "$CONFIG"
finish
