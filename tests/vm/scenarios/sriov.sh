#!/usr/bin/env bash
# Scenario (issue 4): SR-IOV VFs of the igb PF (7 VFs) through passthroughctl on a real kernel:
# create with --assign (no host VF driver ever binds them, autoprobe restored), resize, refusals
# while a VF's group is held open, persistence across a daemon restart, destroy, bad inputs.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

pf="$(find_dev 0x8086 0x10c9)"
e1000e="$(find_dev 0x8086 0x10d3)"
check pf-found test -n "$pf"
expect_eq pf-totalvfs "$(cat "$SYS/$pf/sriov_totalvfs")" 7
expect_eq pf-starts-without-vfs "$(cat "$SYS/$pf/sriov_numvfs")" 0
# With igbvf loaded and autoprobe on, new VFs WOULD be bound to igbvf.
modprobe igbvf
modprobe vfio-pci
expect_eq pf-autoprobe-on "$(cat "$SYS/$pf/sriov_drivers_autoprobe")" 1
dmesg_before="$(dmesg | wc -l)"

start_system_bus
# Started in this shell, not inside `check` (a subshell), so stop_daemon knows its pid.
start_daemon
check daemon-starts "$CTL" status

vfs_of() { local i; for ((i = 0; i < $1; i++)); do basename "$(readlink "$SYS/$pf/virtfn$i")"; done; }
drivers_of() { local a; for a in $(vfs_of "$1"); do driver_of "$a"; done | sort | uniq -c | tr -s ' ' | sed 's/^ //' | tr '\n' ' ' | sed 's/ $//'; }

# Bad inputs: documented exit codes, nothing changed.
exit_is count-above-total 2 "$CTL" vf create "$pf" --count 8
check count-above-total-says-why grep -q "at most 7" "$PT_OUT/last.err"
exit_is count-zero 2 "$CTL" vf create "$pf" --count 0
check count-zero-says-destroy grep -q "vf destroy" "$PT_OUT/last.err"
exit_is not-sriov 2 "$CTL" vf create "$e1000e" --count 1
exit_is no-such-pf 4 "$CTL" vf create 0000:0a:00.0 --count 1
expect_eq bad-inputs-change-nothing "$(cat "$SYS/$pf/sriov_numvfs")" 0

# Create 4 with --assign: all on vfio-pci, never on igbvf, autoprobe back to 1.
exit_is create-4-assign 0 "$CTL" --json vf create "$pf" --count 4 --assign
expect_eq create-4-json-lists-4 "$(jq length "$PT_OUT/last.out")" 4
expect_eq create-4-numvfs "$(cat "$SYS/$pf/sriov_numvfs")" 4
expect_eq create-4-all-on-vfio "$(drivers_of 4)" "4 vfio-pci"
expect_eq create-4-autoprobe-restored "$(cat "$SYS/$pf/sriov_drivers_autoprobe")" 1
probed=0
for a in $(vfs_of 4); do
    dmesg | tail -n +"$dmesg_before" | grep -q "igbvf $a" && probed=$((probed + 1))
done
expect_eq create-4-igbvf-never-probed "$probed" 0
vf0="$(vfs_of 1)"
exit_is vf-as-pf 2 "$CTL" vf create "$vf0" --count 1
check vf-as-pf-says-why grep -q "not a PF" "$PT_OUT/last.err"
exit_is list 0 "$CTL" --json vf list "$pf"
expect_eq list-indexes "$(jq -r '[.[].index] | join(",")' "$PT_OUT/last.out")" "0,1,2,3"
expect_eq list-assigned "$(jq -r '[.[] | select(.assigned)] | length' "$PT_OUT/last.out")" 4

# A resize that would take the assigned VFs off vfio-pci is refused, naming them (issue 9, item 11).
exit_is resize-without-assign-refused 5 "$CTL" vf create "$pf" --count 7
check resize-refusal-names-assigned-vfs grep -q "VF 0 (" "$PT_OUT/last.err"
check resize-refusal-says-force grep -q -- "--force" "$PT_OUT/last.err"
expect_eq resize-refused-changes-nothing "$(cat "$SYS/$pf/sriov_numvfs") $(drivers_of 4)" "4 4 vfio-pci"

# Resize to 7 with --assign, none in use: goes through 0, every VF ends on vfio-pci.
exit_is resize-7 0 "$CTL" vf create "$pf" --count 7 --assign
expect_eq resize-7-numvfs "$(cat "$SYS/$pf/sriov_numvfs")" 7
expect_eq resize-7-all-on-vfio "$(drivers_of 7)" "7 vfio-pci"
expect_eq resize-7-autoprobe-restored "$(cat "$SYS/$pf/sriov_drivers_autoprobe")" 1

# A process holding VF 0's group open: resize and destroy refused, naming it.
group="$(link_name "$SYS/$vf0/iommu_group")"
sleep 1000 < "/dev/vfio/$group" &
holder=$!
check holder-has-group-open wait_for "ls -l /proc/$holder/fd | grep -q /dev/vfio/$group" 10
exit_is resize-refused-in-use 5 "$CTL" vf create "$pf" --count 4 --assign
check resize-refusal-names-process grep -q "sleep (pid $holder)" "$PT_OUT/last.err"
exit_is destroy-refused-in-use 5 "$CTL" vf destroy "$pf"
check destroy-refusal-names-process grep -q "sleep (pid $holder)" "$PT_OUT/last.err"
exit_is destroy-force-refused-in-use 5 "$CTL" vf destroy "$pf" --force
exit_is list-shows-holder 0 "$CTL" --json vf list "$pf"
expect_eq list-holder "$(jq -r '.[0].in_use_by' "$PT_OUT/last.out")" "sleep (pid $holder)"
expect_eq in-use-changes-nothing "$(cat "$SYS/$pf/sriov_numvfs") $(drivers_of 7)" "7 7 vfio-pci"
kill "$holder"; wait "$holder" 2>/dev/null

# Persistent VFs come back after a restart (numvfs reset by hand, as a reboot would).
old_pid="$(daemon_pid)"
check old-daemon-known test -n "$old_pid"
stop_daemon
echo 0 > "$SYS/$pf/sriov_numvfs"
expect_eq reboot-removed-vfs "$(cat "$SYS/$pf/sriov_numvfs")" 0
check state-records-vfs grep -q '^\[\[vfs\]\]' "$STATE_DIR/state.toml"
check state-has-no-vf-addresses sh -c "! grep -q '$vf0' '$STATE_DIR/state.toml'"
check old-daemon-gone wait_for "! alive $old_pid" 10
start_daemon
check daemon-restarts "$CTL" status
check restarted-daemon-is-new wait_for "grep -c 'serving org.passthroughd' '$PT_OUT/daemon.log' | grep -qx 2" 5
expect_eq restart-recreated "$(cat "$SYS/$pf/sriov_numvfs")" 7
expect_eq restart-same-indexes-on-vfio "$(drivers_of 7)" "7 vfio-pci"
exit_is restart-list 0 "$CTL" --json vf list "$pf"
expect_eq restart-list-indexes "$(jq -r '[.[] | select(.assigned) | .index] | join(",")' "$PT_OUT/last.out")" "0,1,2,3,4,5,6"
expect_eq restart-autoprobe "$(cat "$SYS/$pf/sriov_drivers_autoprobe")" 1

# Destroy: assigned VFs only with --force; then back to 0 and the VFs are forgotten.
exit_is destroy-assigned-refused 5 "$CTL" vf destroy "$pf"
check destroy-refusal-says-assigned grep -q "assigned" "$PT_OUT/last.err"
expect_eq destroy-refused-changes-nothing "$(cat "$SYS/$pf/sriov_numvfs")" 7
exit_is destroy 0 "$CTL" vf destroy "$pf" --force
expect_eq destroy-numvfs "$(cat "$SYS/$pf/sriov_numvfs")" 0
check destroy-forgets sh -c "! grep -q '^\[\[vfs\]\]' '$STATE_DIR/state.toml'"
expect_eq destroy-pf-still-on-igb "$(driver_of "$pf")" igb
stop_daemon
finish
