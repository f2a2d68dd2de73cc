#!/usr/bin/env bash
# The demo: what passthroughd sees on a real kernel with an emulated IOMMU and SR-IOV NIC.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
pf="$(find_dev 0x8086 0x10c9)"
echo; echo "=== passthroughd inventory (kernel $(uname -r), $(ls /sys/kernel/iommu_groups | wc -l) IOMMU groups)"
"$PTD" inventory
echo "=== echo 4 > $SYS/$pf/sriov_numvfs; then the inventory again"
echo 4 > "$SYS/$pf/sriov_numvfs"
wait_for "[ -e $SYS/$pf/virtfn3 ]" 20
command -v udevadm >/dev/null && udevadm settle --timeout=20
"$PTD" inventory
check inventory-json "$PTD" inventory --json
finish
