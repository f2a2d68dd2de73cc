#!/usr/bin/env bash
# Boot a throwaway VM (QEMU q35 + intel-iommu, real Debian 6.12 kernel, host filesystem read-only
# via virtme-ng) and run SCENARIO inside it as root.
#
#   tests/vm/run.sh SCENARIO_SCRIPT [ARGS...]
#
# Environment (all optional):
#   PT_BIN          host dir with freshly built binaries (default: REPO/target/debug)
#   PT_OUT          host dir shared read-write with the guest, same path inside (default: fresh temp dir)
#   PT_VM_TIMEOUT   seconds before a hung guest is killed (default 300)
#   PT_VM_ACCEL     tcg (default) | kvm | auto (kvm if it really boots a guest, else tcg)
#   PT_VM_MEM       guest memory (default 1G);  PT_VM_CPUS: vCPUs (default 2)
#   PT_KERNEL       kernel image (default: newest /boot/vmlinuz-6.12+)
#   PT_VNG_VENV     virtme-ng venv (default /opt/virtme-ng, made by setup.sh)
#   PT_VM_QUIET=1   do not stream the guest console (it is always kept in PT_OUT/console.log)
# Exit status: 0 only if the scenario ran to `finish` and no check failed.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
die() { echo "run.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: $0 SCENARIO_SCRIPT [ARGS...]"
SCEN="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" || die "no such scenario: $1"
[ -f "$SCEN" ] || die "no such scenario: $1"
shift

PT_BIN="${PT_BIN:-$REPO/target/debug}"
TIMEOUT="${PT_VM_TIMEOUT:-300}"
ACCEL="${PT_VM_ACCEL:-tcg}"
MEM="${PT_VM_MEM:-1G}"
CPUS="${PT_VM_CPUS:-2}"
VNG_VENV="${PT_VNG_VENV:-/opt/virtme-ng}"
KERNEL="${PT_KERNEL:-$(ls -1 /boot/vmlinuz-6.1[2-9]* /boot/vmlinuz-6.[2-9]* 2>/dev/null | sort -V | tail -n1)}"

[ "$(id -u)" = 0 ] || die "must run as root (vng boots the host filesystem; the guest runs as root)"
[ -x "$VNG_VENV/bin/vng" ] || die "virtme-ng missing: run tests/vm/setup.sh"
[ -n "$KERNEL" ] && [ -r "$KERNEL" ] || die "no 6.12+ kernel in /boot: run tests/vm/setup.sh"
export PATH="$VNG_VENV/bin:$PATH"   # vng runs virtme-run from PATH

if [ -z "${PT_OUT:-}" ]; then
    PT_OUT="$(mktemp -d "${TMPDIR:-/tmp}/pt-vm.XXXXXX")"
fi
mkdir -p "$PT_OUT" || die "cannot create PT_OUT=$PT_OUT"
PT_OUT="$(cd "$PT_OUT" && pwd)"
RESULTS="$PT_OUT/results.txt"
CONSOLE="$PT_OUT/console.log"
rm -f "$RESULTS" "$CONSOLE" "$PT_OUT/kernel-console.log" "$PT_OUT/dmesg.txt"

kvm_works() {
    [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    grep -qE '\b(vmx|svm)\b' /proc/cpuinfo || return 1
    # Probe: KVM must run a guest with -cpu host (what vng uses), not just open /dev/kvm.
    timeout 20 qemu-system-x86_64 -accel kvm -cpu host -machine q35,kernel-irqchip=split -nodefaults \
        -display none -no-reboot -kernel "$KERNEL" -append 'panic=-1 console=none' -m 256 \
        </dev/null >/dev/null 2>&1
    [ $? = 0 ]
}
case "$ACCEL" in
    tcg) use_kvm=0 ;;
    kvm) use_kvm=1 ;;
    auto) if kvm_works; then use_kvm=1; else use_kvm=0; fi ;;
    *) die "PT_VM_ACCEL must be tcg, kvm or auto" ;;
esac

# The test devices. Root ports at fixed slots so guest addresses are stable:
#   00:10.0 root port -> igb (SR-IOV PF, 7 VFs)
#   00:11.0 root port -> e1000e
#   00:12.0 root port -> pcie-pci-bridge -> e1000 (slot 1) + pcnet (slot 2), one IOMMU group
#   00:13.0 root port -> virtio-blk (a scratch disk, /dev/vda in the guest: scenarios mount it to
#           prove the mounted-filesystem guard on a real block device)
#   00:14.0 virtio-9p: the host's root again, for the page-cached view of programs (guest.sh)
#   00:15.0 root port -> a second igb (SR-IOV PF, 7 VFs): hosts often have several PFs, and
#           benchmarks need 2 PFs x 7 VFs. Scenarios use the first PF (find_dev) unless about all.
# The default-route NIC is vng's virtio-net (--net user), on pcie.0, not one of these.
# The test NICs have no backend (qemu warns "nic ... has no peer"): they exist only to be bound/unbound.
if [ "$use_kvm" = 1 ]; then
    MACHINE="q35,kernel-irqchip=split"   # intremap under KVM needs the split irqchip
    ACCEL_ARGS=()
else
    MACHINE="q35"
    ACCEL_ARGS=(--disable-kvm)
fi
DISK="$PT_OUT/scratch-disk.img"
rm -f "$DISK" && truncate -s 64M "$DISK" || die "cannot create the scratch disk $DISK"
QEMU_OPTS=(
    -machine "$MACHINE"
    -device intel-iommu,intremap=on,caching-mode=on
    -device pcie-root-port,id=rp_igb,bus=pcie.0,addr=0x10.0,chassis=1,slot=1
    -device igb,id=igb0,bus=rp_igb,mac=52:54:00:12:01:00
    -device pcie-root-port,id=rp_e1000e,bus=pcie.0,addr=0x11.0,chassis=2,slot=2
    -device e1000e,id=e1000e0,bus=rp_e1000e,mac=52:54:00:12:02:00
    -device pcie-root-port,id=rp_br,bus=pcie.0,addr=0x12.0,chassis=3,slot=3
    -device pcie-pci-bridge,id=pcibr,bus=rp_br
    -device e1000,id=e1000_0,bus=pcibr,addr=0x1.0,mac=52:54:00:12:04:01
    -device pcnet,id=pcnet0,bus=pcibr,addr=0x2.0,mac=52:54:00:12:04:02
    -device pcie-root-port,id=rp_blk,bus=pcie.0,addr=0x13.0,chassis=4,slot=4
    -drive "file=$DISK,if=none,id=disk0,format=raw"
    -device virtio-blk-pci,id=blk0,drive=disk0,bus=rp_blk
    # A second, read-only view of the host's root that guest.sh mounts with a page cache (vng's
    # own root mount has none, and one 9p channel serves one mount).
    -fsdev local,id=ptcache,path=/,security_model=none,readonly=on
    -device virtio-9p-pci,fsdev=ptcache,mount_tag=ptcache,bus=pcie.0,addr=0x14.0
    -device pcie-root-port,id=rp_igb1,bus=pcie.0,addr=0x15.0,chassis=5,slot=5
    -device igb,id=igb1,bus=rp_igb1,mac=52:54:00:12:06:00
    # The guest kernel's console also on ttyS1, into a host file (console=ttyS1 below; ttyS0 stays
    # last, so it stays /dev/console for vng's init). vng sends its own console to /dev/null, and a
    # guest that panics leaves only this behind. loglevel stays 1: it holds only oopses and panics,
    # which force themselves onto the console.
    -serial "file:$PT_OUT/kernel-console.log"
)

q() { printf '%q ' "$@"; }
# The guest does not inherit this environment: the scenarios' own knobs (PT_BENCH_*) go by name.
BENCH_ENV=()
for v in $(compgen -v PT_BENCH_ || true); do BENCH_ENV+=("$v=${!v}"); done
GUEST_CMD="$(q env PT_BIN="$PT_BIN" PT_REPO="$REPO" PT_OUT="$PT_OUT" "${BENCH_ENV[@]}" bash "$HERE/guest.sh" "$SCEN" "$@")"

echo "run.sh: kernel $KERNEL, accel $([ "$use_kvm" = 1 ] && echo kvm || echo tcg), timeout ${TIMEOUT}s, scenario $SCEN, PT_OUT $PT_OUT" >&2
start=$(date +%s.%N)
# No TTY needed: stdin is /dev/null. `timeout` kills the whole process group (vng, virtme-run, qemu).
set +e
if [ "${PT_VM_QUIET:-0}" = 1 ]; then
    timeout --kill-after=15 "$TIMEOUT" vng --run "$KERNEL" "${ACCEL_ARGS[@]}" --disable-microvm --force-9p \
        --memory "$MEM" --cpus "$CPUS" --network user --rwdir "$PT_OUT=$PT_OUT" \
        --append "intel_iommu=on iommu=pt console=ttyS1 console=ttyS0" --qemu-opts="$(q "${QEMU_OPTS[@]}")" \
        --exec "$GUEST_CMD" </dev/null >"$CONSOLE" 2>&1
    rc=$?
else
    timeout --kill-after=15 "$TIMEOUT" vng --run "$KERNEL" "${ACCEL_ARGS[@]}" --disable-microvm --force-9p \
        --memory "$MEM" --cpus "$CPUS" --network user --rwdir "$PT_OUT=$PT_OUT" \
        --append "intel_iommu=on iommu=pt console=ttyS1 console=ttyS0" --qemu-opts="$(q "${QEMU_OPTS[@]}")" \
        --exec "$GUEST_CMD" </dev/null 2>&1 | tee "$CONSOLE"
    rc=${PIPESTATUS[0]}
fi
set -e
end=$(date +%s.%N)
rm -f "$DISK"
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')
echo "run.sh: boot+run took ${elapsed}s (vng exit $rc)" >&2

if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "run.sh: FAILED: guest did not finish within ${TIMEOUT}s (killed); console: $CONSOLE" >&2
    exit 1
fi
if [ ! -f "$RESULTS" ] || ! grep -q '^DONE ' "$RESULTS"; then
    echo "run.sh: FAILED: no results from the guest (scenario died or guest crashed); console tail:" >&2
    tail -n 30 "$CONSOLE" >&2
    if [ -s "$PT_OUT/kernel-console.log" ]; then
        echo "run.sh: the guest kernel's console (oopses and panics):" >&2
        tail -n 60 "$PT_OUT/kernel-console.log" >&2
    fi
    echo "run.sh: the guest kernel's last messages ($PT_OUT/dmesg.txt):" >&2
    tail -n 20 "$PT_OUT/dmesg.txt" >&2 2>/dev/null || true
    exit 3   # told apart from failed checks (1): the guest died
fi
grep '^FAIL ' "$RESULTS" >&2 || true
summary="$(grep '^DONE ' "$RESULTS" | tail -n1)"
echo "run.sh: $summary (results: $RESULTS)" >&2
if grep -q '^FAIL ' "$RESULTS" || ! grep -q '^DONE .* fail=0\b' "$RESULTS"; then
    exit 1
fi
exit 0
