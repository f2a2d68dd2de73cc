#!/usr/bin/env bash
# Scenario (issue 5): the host report inside the guest tells the truth — IOMMU active via DMAR with
# the kernel's group count, interrupt remapping on (the VM has intremap=on), the guest detected as
# a VM (QEMU, TCG: an emulated AMD CPU with svm and no vmx, under an emulated *Intel* IOMMU), KVM
# verdicts matching /proc/modules and /dev/kvm. kvm-ok and virt-host-validate run in the same
# guest; where they disagree with the truth or with us is recorded as NOTE, never failed on. The
# daemon then serves the same report on the system bus: passthroughctl prints what passthroughd does.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

J="$PT_OUT/host.json"
"$PTD" host --json > "$J" 2> "$PT_OUT/host.stderr"
check host-json-runs jq -e '.schema_version == 1' "$J"
"$PTD" host > "$PT_OUT/host.txt"
check host-text-runs grep -q 'VFIO passthrough' "$PT_OUT/host.txt"
c() { jq -r --arg id "$1" ".checks[] | select(.id==\$id) | $2" "$J"; }

# The truth, read here straight from the kernel.
k_groups="$(ls /sys/kernel/iommu_groups | wc -l)"
k_dmar=no; [ -e /sys/firmware/acpi/tables/DMAR ] && k_dmar=yes
k_ivrs=no; [ -e /sys/firmware/acpi/tables/IVRS ] && k_ivrs=yes
k_ir=no; grep -q ' IR-' /proc/interrupts && k_ir=yes
k_vendor="$(sed -n 's/^vendor_id[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
k_vmx=no; grep -qw vmx /proc/cpuinfo && k_vmx=yes
k_svm=no; grep -qw svm /proc/cpuinfo && k_svm=yes
k_kvm_mod=no; grep -qE '^kvm_(intel|amd) ' /proc/modules && k_kvm_mod=yes
k_devkvm=no; [ -c /dev/kvm ] && k_devkvm=yes
note "kernel truth: vendor $k_vendor vmx=$k_vmx svm=$k_svm DMAR=$k_dmar IVRS=$k_ivrs groups=$k_groups IR=$k_ir kvm_vendor_module=$k_kvm_mod /dev/kvm=$k_devkvm"

expect_eq dmar-in-guest "$k_dmar" yes
expect_eq acpi-table-verdict "$(c iommu.acpi_table .verdict)" pass
check acpi-table-says-dmar jq -e '.iommu.acpi_tables == ["DMAR"]' "$J"
check acpi-table-summary-dmar sh -c "jq -r '.checks[] | select(.id==\"iommu.acpi_table\") | .summary' '$J' | grep -q '^DMAR (Intel VT-d) present'"
expect_eq group-count "$(jq -r .iommu.group_count "$J")" "$k_groups"
expect_eq groups-verdict "$(c iommu.groups .verdict)" pass
expect_eq default-domain-identity "$(jq -r '.iommu.default_domains.identity' "$J")" "$k_groups"   # iommu=pt
expect_eq units "$(jq -r '.iommu.units | join(" ")' "$J")" "$(ls /sys/class/iommu | tr '\n' ' ' | sed 's/ $//')"
expect_eq interrupt-remapping-kernel "$k_ir" yes
expect_eq interrupt-remapping-verdict "$(c iommu.interrupt_remapping .verdict)" pass
check interrupt-remapping-evidence sh -c "jq -r '.checks[] | select(.id==\"iommu.interrupt_remapping\") | .evidence' '$J' | grep -q 'ecap IR=1'"
expect_eq cmdline-verdict "$(c iommu.cmdline .verdict)" pass

# A VM, QEMU by DMI, and no vmx under TCG.
expect_eq guest-detected "$(jq -r .cpu.hypervisor "$J")" true
expect_eq guest-hypervisor-qemu "$(jq -r .cpu.hypervisor_vendor "$J")" QEMU
expect_eq hypervisor-verdict "$(c cpu.hypervisor .verdict)" warn
expect_eq no-vmx "$k_vmx" no
expect_eq cpu-vendor "$(jq -r .cpu.vendor "$J")" "$k_vendor"
ext="$(jq -r '.cpu.virt_extension // "none"' "$J")"
expect_eq virt-extension-matches-cpuinfo "$ext" "$([ "$k_svm" = yes ] && echo svm || echo none)"
if [ "$ext" = none ]; then
    check no-bios-advice-in-guest sh -c "! jq -r '.checks[].fix // empty' '$J' | grep -qi -e firmware -e bios"
    check nested-advice sh -c "jq -r '.checks[] | select(.id==\"cpu.virt_extension\") | .fix' '$J' | grep -q nested"
fi

# KVM verdicts agree with /proc/modules and /dev/kvm.
expect_eq kvm-modules-verdict "$(c kvm.modules .verdict)" "$([ "$k_kvm_mod" = yes ] && echo pass || echo fail)"
expect_eq dev-kvm-verdict "$(c kvm.dev_kvm .verdict)" "$([ "$k_devkvm" = yes ] && echo pass || echo fail)"
check firmware-by-module-evidence sh -c "jq -r '.checks[] | select(.id==\"cpu.firmware_enabled\") | .evidence' '$J' | grep -q -e 'module state' -e MSR"
expect_eq vfio-modules "$(c vfio.modules .verdict)" pass
expect_eq dev-vfio "$(c vfio.dev_vfio .verdict)" pass
expect_eq kconfig-source "$(c kconfig.source .evidence)" "/boot/config-$(uname -r)"
# Every igb PF (the VM has two), each with its 7 VFs, as the kernel lists them.
expect_eq sriov-igb "$(jq -r '.sriov_devices[] | select(.vendor_id==32902 and .device_id==4297) | "\(.address) \(.total_vfs)"' "$J" | sort | tr '\n' ' ')" \
    "$(for a in $(find_devs 0x8086 0x10c9); do echo "$a $(cat "$SYS/$a/sriov_totalvfs")"; done | tr '\n' ' ')"
expect_eq overall-ready "$(jq -r .overall.ready "$J")" true

# With the msr module the firmware verdict comes from the register itself.
if modprobe msr 2>/dev/null && [ -e /dev/cpu/0/msr ]; then
    "$PTD" host --json > "$PT_OUT/host-msr.json"
    check firmware-from-msr sh -c "jq -r '.checks[] | select(.id==\"cpu.firmware_enabled\") | .verdict + \" \" + .evidence' '$PT_OUT/host-msr.json' | grep -q '^pass /dev/cpu/0/msr MSR'"
    note "with msr: $(jq -r '.checks[] | select(.id=="cpu.firmware_enabled") | .evidence' "$PT_OUT/host-msr.json")"
else
    note "msr module not available: firmware verdict rests on the kvm module state"
fi

# The same report from the daemon on the guest's system bus (it reads the root it was started
# with, /, as root): passthroughctl --json host is passthroughd host --json, and the text closes
# with the overall verdict. Both are taken after the msr step, so they read the same evidence.
start_system_bus
start_daemon
check daemon-answers "$CTL" status
"$CTL" --json host > "$PT_OUT/ctl-host.json" 2> "$PT_OUT/ctl-host.stderr"
expect_eq ctl-host-json-exit "$?" 0
"$PTD" host --json > "$PT_OUT/ptd-host.json" 2>> "$PT_OUT/host.stderr"
check ctl-json-is-one-document jq -e '.schema_version == 1' "$PT_OUT/ctl-host.json"
# Equal in every field but one: a NUMA node's free memory is a live reading (node meminfo
# MemFree) that moves between the two reads, so it is compared for presence, not value.
free_kb='[.numa_nodes[].memory_free_kb]'
jq -S "del(.numa_nodes[].memory_free_kb)" "$PT_OUT/ptd-host.json" > "$PT_OUT/ptd-host.sorted.json"
jq -S "del(.numa_nodes[].memory_free_kb)" "$PT_OUT/ctl-host.json" > "$PT_OUT/ctl-host.sorted.json"
check ctl-json-equals-passthroughd-json diff -u "$PT_OUT/ptd-host.sorted.json" "$PT_OUT/ctl-host.sorted.json"
check ctl-json-numa-free-present jq -e "$free_kb | length > 0 and all(type == \"number\")" "$PT_OUT/ctl-host.json"
note "numa memory_free_kb (live, moves between reads): passthroughd $(jq -c "$free_kb" "$PT_OUT/ptd-host.json"), passthroughctl $(jq -c "$free_kb" "$PT_OUT/ctl-host.json")"
"$CTL" host > "$PT_OUT/ctl-host.txt" 2>> "$PT_OUT/ctl-host.stderr"
expect_eq ctl-host-text-exit "$?" 0
verdict_line="$(jq -r '.overall | ({pass: "PASS", warn: "WARN", fail: "FAIL"}[.verdict]) + " " + .summary' "$PT_OUT/ctl-host.json")"
# The verdict is the last line at column 0; only its indented "first fix" line may follow it.
expect_eq ctl-text-last-line-is-verdict "$(grep -v '^ ' "$PT_OUT/ctl-host.txt" | tail -n 1)" "$verdict_line"
expect_eq ctl-text-after-verdict "$(sed -n '/^[A-Z]/h; /^[A-Z]/!H; ${x;p}' "$PT_OUT/ctl-host.txt" | sed 1d | grep -vc '^     first ')" 0
expect_eq ctl-text-check-lines "$(grep -cE '^(PASS|WARN|FAIL|N/A ) [a-z0-9_]+\.[a-z0-9_.]+ ' "$PT_OUT/ctl-host.txt")" "$(jq '.checks | length' "$PT_OUT/ctl-host.json")"
note "passthroughctl host, last lines: $(tail -n 2 "$PT_OUT/ctl-host.txt" | tr '\n' '|')"
stop_daemon

# The tools users would otherwise run, in the same guest.
if command -v kvm-ok >/dev/null; then
    kvm-ok > "$PT_OUT/kvm-ok.txt" 2>&1; kvm_ok_rc=$?
    note "kvm-ok (exit $kvm_ok_rc): $(tr '\n' ' ' < "$PT_OUT/kvm-ok.txt")"
    ours="$(c kvm.dev_kvm .verdict)/$(c kvm.modules .verdict)"
    if [ "$kvm_ok_rc" = 0 ] && [ "$ours" != pass/pass ]; then note "DISAGREE kvm-ok says KVM can be used; we say kvm.dev_kvm/kvm.modules $ours"; fi
    if [ "$kvm_ok_rc" != 0 ] && [ "$ours" = pass/pass ]; then note "DISAGREE kvm-ok says KVM cannot be used; we and the kernel (/dev/kvm=$k_devkvm, module=$k_kvm_mod) say it can"; fi
    if [ "$kvm_ok_rc" = 0 ]; then note "kvm-ok omits: it is a guest under QEMU (TCG), KVM here is nested and emulated; it checks no IOMMU, VFIO or interrupt remapping"; fi
else
    note "kvm-ok not installed (package cpu-checker)"
fi
if command -v virt-host-validate >/dev/null; then
    virt-host-validate qemu > "$PT_OUT/virt-host-validate.txt" 2>&1; vhv_rc=$?
    note "virt-host-validate qemu exit $vhv_rc; IOMMU lines: $(grep -i iommu "$PT_OUT/virt-host-validate.txt" | sed 's/  */ /g' | tr '\n' '|')"
    if grep -i 'IOMMU support' "$PT_OUT/virt-host-validate.txt" | grep -qE 'WARN|FAIL'; then
        note "DISAGREE virt-host-validate reports no IOMMU support ($(grep -i 'IOMMU support' "$PT_OUT/virt-host-validate.txt" | sed 's/.*: //')) though DMAR=$k_dmar and $k_groups groups exist: it picks the table from the CPU vendor ($k_vendor); we report DMAR from the tables themselves"
    fi
    if grep -i 'enabled by kernel' "$PT_OUT/virt-host-validate.txt" | grep -qE 'WARN|FAIL'; then
        note "DISAGREE virt-host-validate says the IOMMU is not enabled by the kernel; the kernel has $k_groups groups"
    fi
    if grep -i 'hardware virtualization' "$PT_OUT/virt-host-validate.txt" | grep -q PASS; then
        note "virt-host-validate: hardware virtualization PASS, without saying this is a guest whose svm is emulated by TCG"
    fi
    grep -qi 'interrupt remap' "$PT_OUT/virt-host-validate.txt" || note "virt-host-validate does not check interrupt remapping (kernel: IR=$k_ir; we: $(c iommu.interrupt_remapping .verdict))"
    while IFS= read -r line; do note "virt-host-validate: $line"; done < <(grep -E ': (WARN|FAIL)' "$PT_OUT/virt-host-validate.txt" | sed 's/  */ /g')
else
    note "virt-host-validate not installed (package libvirt-clients)"
fi
finish
