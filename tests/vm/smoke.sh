#!/usr/bin/env bash
# Smoke scenario: the VM has the kernel and devices the real-kernel suite relies on.
. "$PT_REPO/tests/vm/lib.sh"

igb_pf() { for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10c9 ] && { basename "$d"; return; }; done; }

check kernel-6.12 sh -c 'uname -r | grep -q "^6\.12"'
check iommu-groups-present sh -c '[ -n "$(ls /sys/kernel/iommu_groups)" ]'
check modprobe-vfio-pci modprobe vfio-pci
check vfio-pci-from-6.12-tree sh -c 'modinfo -n vfio-pci | grep -q "^/lib/modules/$(uname -r)/"'
check vfio-pci-driver-dir test -d /sys/bus/pci/drivers/vfio-pci
pf="$(igb_pf)"
check igb-pf-found test -n "$pf"
expect_eq igb-sriov-totalvfs "$(cat /sys/bus/pci/devices/$pf/sriov_totalvfs 2>/dev/null)" 7
expect_eq igb-driver "$(basename "$(readlink /sys/bus/pci/devices/$pf/driver)")" igb
check default-route sh -c 'ip route show default | grep -q " dev "'
check host-binaries-visible test -x /usr/bin/jq
check pt-out-writable sh -c 'echo ok > "$PT_OUT/smoke-write" && rm "$PT_OUT/smoke-write"'
note "igb PF $pf; default route: $(ip route show default)"
finish
