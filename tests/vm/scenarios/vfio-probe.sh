#!/usr/bin/env bash
# Scenario (issue 13, the VFIO seam): kernel::vfio::SystemVfio against a real kernel, through the
# example daemon/examples/vfio_probe.rs (build it first: cargo build -p passthroughd --examples).
# An igb VF on vfio-pci is opened as a VMM would (regions, IRQs, reset support, IOMMU backend),
# reset through VFIO; then the typed failures: a group held open (Busy), a group with a member on
# a host driver (NotViable), a function on no VFIO driver (NoGroup).
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

probe="$PT_BIN/vfio_probe"
[ -x "$probe" ] || probe="$PT_BIN/examples/vfio_probe"
check probe-built test -x "$probe"

pf="$(find_dev 0x8086 0x10c9)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
echo 2 > "$SYS/$pf/sriov_numvfs"
vf0="$(basename "$(readlink "$SYS/$pf/virtfn0")")"
vf1="$(basename "$(readlink "$SYS/$pf/virtfn1")")"
raw_bind_vfio "$vf0"
expect_eq vf0-on-vfio "$(driver_of "$vf0")" vfio-pci
group="$(link_name "$SYS/$vf0/iommu_group")"
note "igb PF $pf, VF0 $vf0 (group $group), VF1 $vf1 on $(driver_of "$vf1"), e1000 $e1000, pcnet $pcnet"

# The DeviceInfo of an igb VF, probed twice in one process: the second run would be Busy if the
# first had left the group open.
"$probe" --repeat 2 "$vf0" >"$PT_OUT/vf0.json" 2>"$PT_OUT/vf0.err"
expect_eq probe-vf0 "$?" 0
note "vf0: $(jq -c . "$PT_OUT/vf0.json")"
note "vf0: $(cat "$PT_OUT/vf0.err")"
check probe-closes-its-fds grep -q "open fds: before \([0-9]*\), after \1$" "$PT_OUT/vf0.err"
expect_eq vf0-backend "$(jq -r .iommu_backend "$PT_OUT/vf0.json")" type1v2
expect_eq vf0-pci-and-reset "$(jq -c .flags "$PT_OUT/vf0.json")" '{"pci":true,"reset":true}'
expect_eq vf0-bars "$(jq -r '[.regions[] | select(.size > 0) | "\(.name)=\(.size)"] | join(" ")' "$PT_OUT/vf0.json")" \
    "BAR0=16384 BAR3=16384 CONFIG=4096"
expect_eq vf0-irqs "$(jq -r '[.irqs[] | "\(.name)=\(.count)"] | join(" ")' "$PT_OUT/vf0.json")" \
    "INTx=0 MSI=0 MSI-X=3 ERR=1 REQ=1"
# Not noresize: 6.12's vfio-pci adds MSI-X vectors while enabled (dynamic MSI-X).
expect_eq vf0-msix-flags "$(jq -c '.irqs[] | select(.name == "MSI-X") | .flags' "$PT_OUT/vf0.json")" \
    '{"eventfd":true,"maskable":false,"automasked":false,"noresize":false}'

# Reset through VFIO, with what sysfs says the kernel would use.
note "vf0 reset_method: $(cat "$SYS/$vf0/reset_method" 2>&1)"
dmesg_before="$(dmesg | wc -l)"
"$probe" --reset "$vf0" >"$PT_OUT/last.out" 2>"$PT_OUT/last.err"
expect_eq reset-vf0 "$?" 0
note "reset: $(cat "$PT_OUT/last.out" "$PT_OUT/last.err")"
note "dmesg after reset: $(dmesg | tail -n +"$((dmesg_before + 1))" | tr '\n' '|')"

# (a) Another process holds the group: Busy, naming the group.
sleep 100 < "/dev/vfio/$group" &
holder=$!
check holder-has-group-open wait_for "ls -l /proc/$holder/fd | grep -q /dev/vfio/$group" 10
exit_is busy-fails 1 "$probe" "$vf0"
note "busy: $(cat "$PT_OUT/last.err" | tr '\n' '|')"
check busy-variant grep -q "^variant: Busy { group: $group, device: None" "$PT_OUT/last.err"
kill "$holder"; wait "$holder" 2>/dev/null
exit_is probe-after-holder-left 0 "$probe" "$vf0"

# (b) One member of the e1000 + pcnet (+ bridge) group on vfio-pci, pcnet still on pcnet32:
# NotViable, also when repeated in one process (the failed open closed the group).
raw_bind_vfio "$e1000"
expect_eq e1000-alone-on-vfio "$(driver_of "$e1000") $(driver_of "$pcnet")" "vfio-pci pcnet32"
shared="$(link_name "$SYS/$e1000/iommu_group")"
exit_is not-viable-fails 1 "$probe" --repeat 2 "$e1000"
note "not viable: $(cat "$PT_OUT/last.err" | tr '\n' '|')"
check not-viable-variant grep -q "^variant: NotViable { group: $shared }" "$PT_OUT/last.err"
# With pcnet on vfio-pci too the group is viable and e1000 opens.
raw_bind_vfio "$pcnet"
exit_is viable-with-both 0 "$probe" "$e1000"
note "e1000: $(jq -c '{flags, bars: [.regions[] | select(.size > 0) | "\(.name)=\(.size)"], irqs: [.irqs[] | "\(.name)=\(.count)"]}' "$PT_OUT/last.out")"
# Conventional PCI without FLR or PM reset, sharing its bus with pcnet: no reset through VFIO.
note "e1000 reset_method: $(cat "$SYS/$e1000/reset_method" 2>&1)"
expect_eq e1000-no-reset "$(jq -r .flags.reset "$PT_OUT/last.out")" false
exit_is e1000-reset-unsupported 1 "$probe" --reset "$e1000"
note "e1000 reset: $(cat "$PT_OUT/last.err" | tr '\n' '|')"
check e1000-reset-variant grep -q "^variant: ResetUnsupported" "$PT_OUT/last.err"

# (c) A function on no VFIO driver: its group has no node.
exit_is no-group-fails 1 "$probe" "$vf1"
note "no group: $(cat "$PT_OUT/last.err" | tr '\n' '|')"
check no-group-variant grep -q "^variant: NoGroup" "$PT_OUT/last.err"
note "scenario took ${SECONDS}s"
finish
