#!/usr/bin/env bash
# Scenario (issue 2): the inventory agrees with the real kernel — every function's ids, class,
# driver and group; every group's members and viability; the igb PF and, after creating four
# VFs, each VF with its PF and index; the two functions behind the PCIe-to-PCI bridge in one group.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

pf="$(find_dev 0x8086 0x10c9)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
check devices-present test -n "$pf" -a -n "$e1000" -a -n "$pcnet"
# The VM has two igb PFs on root ports of their own; the checks below use the first, $pf.
igb_pfs="$(find_devs 0x8086 0x10c9 | tr '\n' ' ' | sed 's/ $//')"
pf2="$(find_devs 0x8086 0x10c9 | sed -n 2p)"
expect_eq two-igb-pfs "$(echo "$igb_pfs" | wc -w)" 2
note "igb PFs $igb_pfs, e1000 $e1000, pcnet $pcnet"

"$PTD" inventory --json > "$PT_OUT/inventory-before.json"
check inventory-before-runs jq -e '.functions | length > 5' "$PT_OUT/inventory-before.json"
check functions-match-kernel-before diff <(kernel_functions) <(inventory_functions "$PT_OUT/inventory-before.json")
check groups-match-kernel-before diff <(kernel_groups) <(inventory_groups "$PT_OUT/inventory-before.json")

q() { jq -r "$1" "$PT_OUT/$2"; }
expect_eq pf-role "$(q ".functions[] | select(.address==\"$pf\") | .sriov.total_vfs" inventory-before.json)" 7
expect_eq pf-numvfs-before "$(q ".functions[] | select(.address==\"$pf\") | .sriov.num_vfs" inventory-before.json)" 0
expect_eq pf-autoprobe "$(q ".functions[] | select(.address==\"$pf\") | .sriov.drivers_autoprobe" inventory-before.json)" true
expect_eq pf-driver "$(q ".functions[] | select(.address==\"$pf\") | .driver" inventory-before.json)" igb
expect_eq every-igb-pf-listed "$(q "[.functions[] | select(.sriov.total_vfs == 7 and .device_id == 4297) | .address] | join(\" \")" inventory-before.json)" "$igb_pfs"
check igb-pfs-own-groups jq -e "[.functions[] | select(.device_id == 4297) | .iommu_group] | unique | length == 2" "$PT_OUT/inventory-before.json"
check pf-not-viable jq -e ".groups[] | select(.members | index(\"$pf\")) | .viable == false and (.blockers[0].driver == \"igb\")" "$PT_OUT/inventory-before.json"

# The two conventional PCI functions behind the bridge share one group: the kernel aliases their
# requester ids to the PCIe-to-PCI bridge, which is in the group too (on no driver).
g_e1000="$(q ".functions[] | select(.address==\"$e1000\") | .iommu_group" inventory-before.json)"
g_pcnet="$(q ".functions[] | select(.address==\"$pcnet\") | .iommu_group" inventory-before.json)"
expect_eq bridged-functions-share-a-group "$g_e1000" "$g_pcnet"
bridge_endpoints="$(jq -r --argjson g "$g_e1000" '[.groups[] | select(.id==$g) | .members[]] as $m
    | [.functions[] | select(.address as $a | $m | index($a)) | select(.class / 65536 | floor != 6) | .address] | join(" ")' \
    "$PT_OUT/inventory-before.json")"
expect_eq bridged-group-endpoints "$bridge_endpoints" "$(printf '%s\n' "$e1000" "$pcnet" | sort | tr '\n' ' ' | sed 's/ $//')"
expect_eq bridged-group-size-kernel "$(ls /sys/kernel/iommu_groups/$g_e1000/devices | wc -l)" \
    "$(q ".groups[] | select(.id==$g_e1000) | .members | length" inventory-before.json)"
check bridged-group-not-viable jq -e ".groups[] | select(.id==$g_e1000) | .viable | not" "$PT_OUT/inventory-before.json"

# Four VFs.
echo 4 > "$SYS/$pf/sriov_numvfs"
check vfs-appear wait_for "[ -e $SYS/$pf/virtfn3 ] && [ -e $SYS/\$(basename \$(readlink $SYS/$pf/virtfn3)) ]" 20
command -v udevadm >/dev/null && udevadm settle --timeout=20
"$PTD" inventory --json > "$PT_OUT/inventory-vfs.json"
check functions-match-kernel-with-vfs diff <(kernel_functions) <(inventory_functions "$PT_OUT/inventory-vfs.json")
check groups-match-kernel-with-vfs diff <(kernel_groups) <(inventory_groups "$PT_OUT/inventory-vfs.json")
expect_eq pf-numvfs-after "$(q ".functions[] | select(.address==\"$pf\") | .sriov.num_vfs" inventory-vfs.json)" 4
expect_eq vf-count "$(q "[.functions[] | select(.vf_of.pf==\"$pf\")] | length" inventory-vfs.json)" 4
expect_eq second-pf-untouched "$(q ".functions[] | select(.address==\"$pf2\") | \"\(.sriov.num_vfs) \(.driver)\"" inventory-vfs.json) $(q "[.functions[] | select(.vf_of.pf==\"$pf2\")] | length" inventory-vfs.json)" "0 igb 0"
for i in 0 1 2 3; do
    vf="$(basename "$(readlink "$SYS/$pf/virtfn$i")")"
    expect_eq "vf$i-pf-and-index" "$(q ".functions[] | select(.address==\"$vf\") | \"\(.vf_of.pf) \(.vf_of.index)\"" inventory-vfs.json)" "$pf $i"
    expect_eq "vf$i-kernel-physfn" "$(link_name "$SYS/$vf/physfn")" "$pf"
done

# Viability follows the drivers: VF0 on vfio-pci and VF1 on no driver make their groups viable
# (each VF has a group of its own here); the PF on igb keeps its group non-viable.
vf0="$(basename "$(readlink "$SYS/$pf/virtfn0")")"
vf1="$(basename "$(readlink "$SYS/$pf/virtfn1")")"
raw_bind_vfio "$vf0"
[ -e "$SYS/$vf1/driver" ] && echo "$vf1" > "$SYS/$vf1/driver/unbind"
expect_eq vf0-bound-vfio "$(link_name "$SYS/$vf0/driver")" vfio-pci
"$PTD" inventory --json > "$PT_OUT/inventory-bound.json"
check groups-match-kernel-after-binds diff <(kernel_groups) <(inventory_groups "$PT_OUT/inventory-bound.json")
check vf0-group-viable jq -e ".groups[] | select(.members | index(\"$vf0\")) | .viable" "$PT_OUT/inventory-bound.json"
check vf1-group-viable jq -e ".groups[] | select(.members | index(\"$vf1\")) | .viable" "$PT_OUT/inventory-bound.json"
check vf0-override-shown jq -e ".functions[] | select(.address==\"$vf0\") | .driver_override == \"vfio-pci\"" "$PT_OUT/inventory-bound.json"
check pf-still-not-viable jq -e ".groups[] | select(.members | index(\"$pf\")) | .viable | not" "$PT_OUT/inventory-bound.json"

# The human table shows every function.
"$PTD" inventory > "$PT_OUT/inventory.txt"
expect_eq table-rows "$(grep -c '^[0-9a-f]\{4\}:' "$PT_OUT/inventory.txt")" "$(ls $SYS | wc -l)"
finish
