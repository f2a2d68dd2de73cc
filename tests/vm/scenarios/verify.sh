#!/usr/bin/env bash
# Scenario (issue 13): VFIO-level proof on a real kernel, through the daemon.
# - An igb VF assigned: `verify` opens it as a VMM would and reports a viable group, its BARs
#   with their real sizes, its MSI-X vectors, its reset support and reset method.
# - One of two functions of a shared group (e1000 + pcnet behind the PCI bridge) put on vfio-pci
#   by hand through sysfs: `verify` names the sibling that keeps the group from being viable.
#   With both assigned, `verify` is ready and says the e1000 cannot be reset; `release --reset`
#   refuses to return a device that cannot be reset.
# - A process holding a VF's group open: `verify` and `release` are refused naming it, and `list`
#   and `show` name it.
# - `release --reset` of a VF resets it through VFIO and the VF ends on igbvf.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
HOLD="$PT_REPO/tests/vm/vfio-hold.py"

pf="$(find_dev 0x8086 0x10c9)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
check devices-found test -n "$pf" -a -n "$e1000" -a -n "$pcnet"
modprobe igbvf
modprobe vfio-pci
start_system_bus
start_daemon
check daemon-starts "$CTL" status

exit_is create-2-assign 0 "$CTL" vf create "$pf" --count 2 --assign --runtime
vf0="$(basename "$(readlink "$SYS/$pf/virtfn0")")"
vf1="$(basename "$(readlink "$SYS/$pf/virtfn1")")"

# 1. An assigned VF, opened through VFIO.
exit_is verify-vf-ready 0 "$CTL" verify "$vf0"
cp "$PT_OUT/last.out" "$PT_OUT/verify-vf0.txt"
exit_is verify-vf-json 0 "$CTL" --json verify "$vf0"
J="$PT_OUT/last.out"
cp "$J" "$PT_OUT/verify-vf0.json"
expect_eq verify-ready "$(jq -r .ready "$J")" true
expect_eq verify-group-viable "$(jq -r .group_viable "$J")" true
expect_eq verify-group-is-the-kernels "$(jq -r .iommu_group "$J")" "$(link_name "$SYS/$vf0/iommu_group")"
expect_eq verify-interrupt-remapping "$(jq -r .interrupt_remapping "$J")" true
expect_eq verify-backend "$(jq -r .device.iommu_backend "$J")" type1v2
# The VF's BARs as the kernel sizes them (sysfs `resource`: start end flags per BAR).
bar_size() {
    local start end
    read -r start end _ < <(sed -n "$(($2 + 1))p" "$SYS/$1/resource")
    if [ $((end)) -gt $((start)) ]; then echo $((end - start + 1)); else echo 0; fi
}
for bar in 0 3; do
    expect_eq "verify-bar$bar-size" "$(jq -r ".device.regions[] | select(.name == \"BAR$bar\") | .size" "$J")" "$(bar_size "$vf0" $bar)"
done
msix="$(jq -r '.device.irqs[] | select(.name == "MSI-X") | .count' "$J")"
note "VF MSI-X vectors: $msix; lspci says: $(lspci -s "$vf0" -vv 2>/dev/null | grep -o 'MSI-X: Enable[^ ]* Count=[0-9]*')"
check verify-msix-vectors test "${msix:-0}" -gt 0
expect_eq verify-msix-matches-lspci "Count=$msix" "$(lspci -s "$vf0" -vv 2>/dev/null | grep -o 'Count=[0-9]*' | head -n1)"
expect_eq verify-reset-supported "$(jq -r .device.flags.reset "$J")" true
expect_eq verify-reset-method "$(jq -r '.reset_methods | join(" ")' "$J")" "$(cat "$SYS/$vf0/reset_method")"
expect_eq verify-left-nothing-open "$(ls -l /proc/"$(daemon_main_pid)"/fd 2>/dev/null | grep -c /dev/vfio)" 0
exit_is show-ready 0 "$CTL" show "$vf0"
check show-says-ready grep -q '^passthrough *ready' "$PT_OUT/last.out"

# 2. A shared group with one member on vfio-pci by hand: the sibling is named.
raw_bind_vfio "$e1000"
expect_eq e1000-on-vfio-by-hand "$(driver_of "$e1000") $(driver_of "$pcnet")" "vfio-pci pcnet32"
exit_is verify-shared-group-not-ready 5 "$CTL" verify "$e1000"
cp "$PT_OUT/last.out" "$PT_OUT/verify-e1000-alone.txt"
check verify-names-sibling grep -q "$pcnet is bound to pcnet32" "$PT_OUT/last.out"
check verify-not-ready-line grep -q "not ready" "$PT_OUT/last.err"
raw_release "$e1000"
exit_is assign-whole-group 0 "$CTL" assign "$e1000" --group --runtime
exit_is verify-group-ready 0 "$CTL" --json verify "$e1000"
cp "$PT_OUT/last.out" "$PT_OUT/verify-e1000.json"
note "e1000: reset $(jq -r .device.flags.reset "$PT_OUT/last.out"), reset_method '$(cat "$SYS/$e1000/reset_method" 2>/dev/null)', notes: $(jq -r '.notes | join("; ")' "$PT_OUT/last.out")"
if [ "$(jq -r .device.flags.reset "$PT_OUT/last.out")" = false ]; then
    exit_is release-reset-refused-without-reset 5 "$CTL" release "$e1000" "$pcnet" --reset
    check release-reset-says-why grep -q "cannot be reset" "$PT_OUT/last.err"
    expect_eq not-returned-unreset "$(driver_of "$e1000") $(driver_of "$pcnet")" "vfio-pci vfio-pci"
fi
exit_is release-group 0 "$CTL" release "$e1000" "$pcnet"
expect_eq group-back "$(driver_of "$e1000") $(driver_of "$pcnet")" "e1000 pcnet32"

# 3. A process holding a VF's group open.
rm -f /tmp/holder.pid
python3 "$HOLD" --device "$vf1" --keep-group --ready /tmp/holder.pid >/dev/null 2>>"$PT_OUT/holder.log" &
holder=$!
check holder-holds wait_for "[ -s /tmp/holder.pid ]" 30
exit_is verify-held-refused 5 "$CTL" verify "$vf1"
check verify-names-holder grep -q "python3 (pid $holder)" "$PT_OUT/last.err"
exit_is release-held-refused 5 "$CTL" release "$vf1"
check release-names-holder grep -q "python3 (pid $holder)" "$PT_OUT/last.err"
expect_eq held-vf-untouched "$(driver_of "$vf1")" vfio-pci
"$CTL" list > "$PT_OUT/list-held.txt"
check list-names-holder grep -q "$vf1 .*in use by python3 (pid $holder)" "$PT_OUT/list-held.txt"
"$CTL" show "$vf1" > "$PT_OUT/show-held.txt"
check show-names-holder grep -q "in use by *python3 (pid $holder)" "$PT_OUT/show-held.txt"
kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null

# 4. Reset on release.
exit_is release-reset-vf 0 "$CTL" release "$vf0" --reset
expect_eq reset-vf-on-igbvf "$(driver_of "$vf0")" igbvf
grep -h "reset\|$vf0" /dev/null "$PT_OUT/daemon.log" | tail -n 3 | while read -r l; do note "daemon: $l"; done
dmesg | grep -i "$vf0" | tail -n 3 | while read -r l; do note "dmesg: $l"; done

exit_is destroy 0 "$CTL" vf destroy "$pf" --force
stop_daemon
finish
