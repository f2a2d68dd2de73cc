#!/usr/bin/env bash
# Scenario (issue 12): leases and the libvirt hook on a real kernel.
# 1. The hook as libvirt calls it (domain XML on stdin): `prepare begin` leases the domain's
#    <hostdev managed='no'> functions (a managed='yes' one is left alone); a second domain asking
#    for the same VF is refused naming the first and nothing changes; other operations change
#    nothing; `release` of a leased VF is refused naming the owner; bad XML fails cleanly; the
#    lease survives a daemon restart (and is then shown stale: no QEMU runs for it); `release
#    end` gives back only the lease: the VF that a request also assigned stays on vfio-pci.
# 2. A real libvirtd (bookworm-backports) in the guest with our hook installed: `virsh create`
#    of a domain with a <hostdev managed='no'> VF leases it, the domain's QEMU holds the VF's
#    /dev/vfio/N (`vf list` names it), `virsh destroy` ends the lease and the VF is on igbvf.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

pf="$(find_dev 0x8086 0x10c9)"
e1000e="$(find_dev 0x8086 0x10d3)"
check devices-found test -n "$pf" -a -n "$e1000e"
modprobe igbvf
modprobe vfio-pci
start_system_bus
start_daemon
check daemon-starts "$CTL" status

exit_is create-3-vfs 0 "$CTL" vf create "$pf" --count 3 --runtime
vf() { basename "$(readlink "$SYS/$pf/virtfn$1")"; }
vf0="$(vf 0)"; vf1="$(vf 1)"; vf2="$(vf 2)"
exit_is request-assigns-vf1 0 "$CTL" assign "$vf1"
drivers() { echo "$(driver_of "$vf0") $(driver_of "$vf1") $(driver_of "$vf2") $(driver_of "$e1000e")"; }
expect_eq before "$(drivers)" "igbvf vfio-pci igbvf e1000e"

# <hostdev> XML for an address, as `show --libvirt` prints it; a domain around hostdevs.
hostdev() { "$CTL" show "$1" --libvirt; }
domain() { local name="$1"; shift; printf "<domain type='qemu'>\n  <name>%s</name>\n  <devices>\n%s\n  </devices>\n</domain>\n" "$name" "$*"; }
hook() { local xml="$1"; shift; printf '%s' "$xml" | "$CTL" libvirt-hook "$@" >"$PT_OUT/last.out" 2>"$PT_OUT/last.err"; }
leases() { "$CTL" --json lease list | jq -c '[.[] | {owner, functions}]'; }
managed_yes="$(hostdev "$e1000e" | sed "s/managed='no'/managed='yes'/")"
vm1="$(domain vm1 "$(hostdev "$vf0")" "$(hostdev "$vf1")" "$managed_yes")"
echo "$vm1" > "$PT_OUT/vm1.xml"

# 1. The hook as libvirt runs it.
hook "$vm1" vm1 prepare begin -
expect_eq prepare-exit-0 "$?" 0
expect_eq prepare-leases-unmanaged "$(drivers)" "vfio-pci vfio-pci igbvf e1000e"
expect_eq lease-listed "$(leases)" "[{\"owner\":\"libvirt:vm1\",\"functions\":[\"$vf0\",\"$vf1\"]}]"
"$CTL" lease list > "$PT_OUT/lease-list.txt"
"$CTL" status > "$PT_OUT/status.txt"
check status-lists-lease grep -q "lease libvirt:vm1: $vf0 $vf1" "$PT_OUT/status.txt"
check status-source-lease grep -q "lease libvirt:vm1" "$PT_OUT/status.txt"
before="$(drivers) $(leases)"

hook "$(domain vm2 "$(hostdev "$vf0")" "$(hostdev "$vf2")")" vm2 prepare begin -
expect_eq second-domain-exit-5 "$?" 5
check second-domain-names-holder grep -q "leased to libvirt:vm1" "$PT_OUT/last.err"
expect_eq second-domain-one-line "$(wc -l < "$PT_OUT/last.err")" 1
note "vm2 refused: $(cat "$PT_OUT/last.err")"
expect_eq second-domain-changes-nothing "$(drivers) $(leases)" "$before"

for op in "start begin" "started begin" "stopped end" "reconnect begin" "migrate begin"; do
    hook "$vm1" vm1 $op -
    expect_eq "op-${op// /-}-exit-0" "$?" 0
done
expect_eq other-ops-change-nothing "$(drivers) $(leases)" "$before"

exit_is release-leased-refused 5 "$CTL" release "$vf0"
check release-names-owner grep -q "leased to libvirt:vm1" "$PT_OUT/last.err"

hook "<domain><name>vm3</name><devices><hostdev type='pci'>" vm3 prepare begin -
expect_eq bad-xml-exit-2 "$?" 2
check bad-xml-says-malformed grep -q "malformed" "$PT_OUT/last.err"
hook "$(domain vm3 "<hostdev mode='subsystem' type='pci' managed='no'><source><address bus='0x01' slot='0x20' function='0'/></source></hostdev>")" vm3 prepare begin -
expect_eq bad-address-exit-2 "$?" 2
expect_eq bad-xml-changes-nothing "$(drivers) $(leases)" "$before"

# A domain without unmanaged PCI devices starts even with the daemon stopped.
stop_daemon
hook "$(domain plain "$managed_yes")" plain prepare begin -
expect_eq no-unmanaged-no-daemon-needed "$?" 0
hook "$vm1" vm1 prepare begin -
expect_eq unmanaged-without-daemon-fails "$?" 69

# The lease survives a restart; with no QEMU for vm1 it is shown stale.
start_daemon
expect_eq lease-survives-restart "$(leases)" "[{\"owner\":\"libvirt:vm1\",\"functions\":[\"$vf0\",\"$vf1\"]}]"
check stale-after-restart sh -c "'$CTL' --json lease list | jq -e '.[0].stale | test(\"no QEMU\")'"
expect_eq drivers-after-restart "$(drivers)" "vfio-pci vfio-pci igbvf e1000e"

hook "$vm1" vm1 release end -
expect_eq release-end-exit-0 "$?" 0
expect_eq release-returns-only-the-lease "$(drivers)" "igbvf vfio-pci igbvf e1000e"
expect_eq no-leases-left "$(leases)" "[]"
check request-still-stored grep -q "$vf1\|assigned = \[1\]" "$STATE_DIR/state.toml"
hook "$vm1" vm1 release end -
expect_eq release-end-again-exit-0 "$?" 0

# An owner of another kind, from the shell.
exit_is vmm-lease 0 "$CTL" lease start vmm:ch-1 "$vf2"
expect_eq vmm-lease-binds "$(driver_of "$vf2")" vfio-pci
exit_is vmm-lease-end 0 "$CTL" lease end vmm:ch-1
expect_eq vmm-lease-returns "$(driver_of "$vf2")" igbvf

# The daemon killed in the middle of a lease's start, then of its end: strace delivers SIGKILL
# at the write to drivers_probe, after the unbind. The next start finishes the journaled plan:
# the lease held (a VMM may already be opening the device), then given back; never a VF without
# a driver, never a lease the kernel does not show.
crash_lease() {  # crash_lease NAME passthroughctl-ARGS...
    local name="$1"; shift
    stop_daemon
    start_daemon strace -f -qq -o /dev/null -P /sys/bus/pci/drivers_probe \
        -e trace=write -e inject=write:error=EIO:signal=KILL
    "$CTL" "$@" >/dev/null 2>&1
    daemon_gone 10
    rm -f "$DAEMON_PIDFILE"
    expect_eq "$name-killed-after-unbind" "$(driver_of "$vf2")" -
    check "$name-journal-left" sh -c "ls '$STATE_DIR' | grep -q '^journal-'"
    check "$name-recovers" start_daemon
    check "$name-journal-done" sh -c "! ls '$STATE_DIR' | grep -q '^journal-'"
}
leased_to_crash() { "$CTL" --json lease list | jq -e '.[] | select(.owner == "vmm:crash")' >/dev/null; }
not_leased_to_crash() { ! leased_to_crash; }
crash_lease crash-lease-start lease start vmm:crash "$vf2"
expect_eq crash-lease-start-finished "$(driver_of "$vf2")" vfio-pci
check crash-lease-start-held leased_to_crash
crash_lease crash-lease-end lease end vmm:crash
expect_eq crash-lease-end-finished "$(driver_of "$vf2")" igbvf
check crash-lease-end-gone not_leased_to_crash

# 2. A real libvirtd with the hook installed (recipe: DESIGN notes in tests/vm/README.md).
if command -v libvirtd >/dev/null && command -v virsh >/dev/null; then
    for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /run/libvirt; do
        mkdir -p "$d" && mount -t tmpfs tmpfs "$d"
    done
    cp -a /etc/libvirt /tmp/etc-libvirt
    mount -t tmpfs tmpfs /etc/libvirt
    cp -a /tmp/etc-libvirt/. /etc/libvirt/
    cat >> /etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
remember_owner = 0
stdio_handler = "file"
EOF
    mkdir -p /etc/libvirt/hooks/qemu.d
    # The shipped hook, pointing at the binary under test.
    sed "s|/usr/bin/passthroughctl|$CTL|" "$PT_REPO/systemd/libvirt-qemu-hook" > /etc/libvirt/hooks/qemu.d/passthroughd
    chmod 755 /etc/libvirt/hooks/qemu.d/passthroughd
    # The guest's init does not reap orphans, and libvirt daemonizes QEMU: a QEMU that exits
    # would stay a zombie that `virsh destroy` still finds alive ("Failed to terminate process
    # with SIGKILL"). libvirtd runs under a subreaper that reaps whatever ends up under it, as
    # systemd does on a host.
    python3 -c '
import ctypes, os
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    os.execvp("libvirtd", ["libvirtd"])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
' >/dev/null 2>&1 &
    libvirt_reaper=$!
    check libvirtd-answers wait_for 'virsh -c qemu:///system version >/dev/null 2>&1' 60
    virsh -c qemu:///system version 2>&1 | head -n 3 | while read -r l; do note "$l"; done
    cat > "$PT_OUT/pt-vm1.xml" <<EOF
<domain type='qemu'>
  <name>pt-vm1</name>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
$(hostdev "$vf0")
  </devices>
</domain>
EOF
    t0=$(date +%s%N)
    exit_is virsh-create 0 virsh -c qemu:///system create "$PT_OUT/pt-vm1.xml"
    note "virsh create took $(( ($(date +%s%N) - t0) / 1000000 )) ms: $(tr '\n' ' ' < "$PT_OUT/last.out") $(tr '\n' ' ' < "$PT_OUT/last.err")"
    expect_eq libvirt-vf-leased "$(leases)" "[{\"owner\":\"libvirt:pt-vm1\",\"functions\":[\"$vf0\"]}]"
    expect_eq libvirt-vf-on-vfio "$(driver_of "$vf0")" vfio-pci
    group="$(link_name "$SYS/$vf0/iommu_group")"
    qemu_pid="$(pgrep -f 'guest=pt-vm1' | head -n1)"
    check qemu-holds-group sh -c "ls -l /proc/$qemu_pid/fd | grep -q '/dev/vfio/$group'"
    "$CTL" --json vf list "$pf" > "$PT_OUT/vf-list-libvirt.json"
    holder="$(jq -r --arg a "$vf0" '.[] | select(.address == $a) | .in_use_by // "-"' "$PT_OUT/vf-list-libvirt.json")"
    note "vf list names the holder: $holder"
    check vf-list-names-qemu sh -c "echo '$holder' | grep -q 'pid $qemu_pid, VM pt-vm1'"
    check libvirt-lease-not-stale sh -c "'$CTL' --json lease list | jq -e '.[0].stale == null'"
    exit_is release-while-running-refused 5 "$CTL" lease end libvirt:pt-vm1
    note "lease end while QEMU runs: $(cat "$PT_OUT/last.err")"
    t0=$(date +%s%N)
    exit_is virsh-destroy 0 virsh -c qemu:///system destroy pt-vm1
    note "virsh destroy took $(( ($(date +%s%N) - t0) / 1000000 )) ms: $(tr '\n' ' ' < "$PT_OUT/last.out") $(tr '\n' ' ' < "$PT_OUT/last.err")"
    # QEMU's exit unmaps the guest's RAM from the emulated IOMMU page by page, which takes a
    # while under TCG: the release hook runs once libvirt has seen QEMU go.
    check libvirt-lease-ended wait_for '[ "$(leases)" = "[]" ]' 120
    expect_eq libvirt-vf-back-on-igbvf "$(driver_of "$vf0")" igbvf
    cp /var/log/libvirt/libvirtd.log /var/log/libvirt/qemu/pt-vm1.log "$PT_OUT/" 2>/dev/null
    pkill -x libvirtd 2>/dev/null
    wait_for "! alive $libvirt_reaper" 20
else
    note "libvirtd or virsh missing: the real-libvirt part was skipped (tests/vm/setup.sh installs them)"
    check libvirtd-installed false
fi

exit_is release-vf1 0 "$CTL" release "$vf1"
exit_is destroy 0 "$CTL" vf destroy "$pf"
stop_daemon
finish
