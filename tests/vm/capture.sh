#!/usr/bin/env bash
# Capture real-kernel sysfs fixtures (tests/fixtures/vm-6.12/{before,after-vfs}).
#   On the host:  tests/vm/capture.sh          boots the VM (run.sh), then copies the captures
#                                              from PT_OUT into tests/fixtures/vm-6.12/
#   In the guest (as a run.sh scenario): captures before/ (igb PF with sriov_numvfs=0) and
#   after-vfs/ (after sriov_numvfs=4) on a tmpfs, checks them, and hands them to the host as
#   PT_OUT/captures.tar (plus PT_OUT/guest-info.txt: addresses, drivers, groups, default route).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "${PT_IN_GUEST:-0}" != 1 ]; then
    set -e
    REPO="$(cd "$HERE/../.." && pwd)"
    export PT_OUT="${PT_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/pt-capture.XXXXXX")}"
    "$HERE/run.sh" "$HERE/capture.sh"
    FIX="$REPO/tests/fixtures/vm-6.12"
    mkdir -p "$FIX"
    rm -rf "${FIX:?}/before" "${FIX:?}/after-vfs"
    tar -C "$FIX" --no-same-owner -xf "$PT_OUT/captures.tar"
    echo "capture.sh: guest facts (addresses, drivers, groups) in $PT_OUT/guest-info.txt"
    echo "capture.sh: fixtures in $FIX ($(du -s --apparent-size -k "$FIX" | cut -f1) KiB, $(find "$FIX" | wc -l) entries)"
    exit 0
fi

. "$PT_REPO/tests/vm/lib.sh"
shopt -s nullglob
CAP="$PT_REPO/tests/vm/capture-sysfs.sh"
# Work on a private tmpfs: many small files over 9p under TCG are slow. The host gets one tar file.
W=/tmp/pt-capture
mkdir -p "$W" && mount -t tmpfs -o mode=0755 pt-capture "$W" || { note "no tmpfs"; }

pf=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10c9 ] && { pf="$(basename "$d")"; break; }
done
check igb-pf-found test -n "$pf"
PFD="/sys/bus/pci/devices/$pf"

# VFs bind to igbvf at creation when it is loaded: load it first, so the capture does not race udev.
modprobe igbvf 2>/dev/null
udevadm settle --timeout=20 2>/dev/null

verify_tree() {  # DEST: every link relative, none dangling, none leaving DEST; groups resolve in DEST
    local dest="$1" x
    for x in "$dest"/sys/bus/pci/devices/*; do
        [ -L "$x/iommu_group" ] || continue
        case "$(readlink -f "$x/iommu_group")" in
            "$dest"/sys/kernel/iommu_groups/[0-9]*) ;;
            *) echo "$x/iommu_group resolves outside $dest"; return 1 ;;
        esac
        [ -f "$x/iommu_group/type" ] || { echo "$x/iommu_group/type missing"; return 1; }
    done
    x="$(find "$dest" -type l -lname '/*')"; [ -z "$x" ] || { echo "absolute links: $x"; return 1; }
    x="$(find "$dest" -xtype l)"; [ -z "$x" ] || { echo "dangling links: $x"; return 1; }
    x="$(find "$dest" -type l -exec readlink -f {} + | grep -v "^$dest/")"; [ -z "$x" ] || { echo "links leaving the tree: $x"; return 1; }
    x="$(find "$dest" -type d -empty)"; [ -z "$x" ] || { echo "empty dirs (git drops them): $x"; return 1; }
    ! grep -rqs -e "$PT_REPO" -e "$PT_OUT" "$dest"
}
count() { local n=0 x; for x in "$1"/sys/bus/pci/devices/*; do n=$((n + 1)); done; echo "$n"; }
t0=$(date +%s)

expect_eq sriov-numvfs-0 "$(cat "$PFD/sriov_numvfs")" 0
check capture-before bash "$CAP" "$W/before"
check before-tree-valid verify_tree "$W/before"
expect_eq before-device-count "$(count "$W/before")" "$(count /)"
note "capture+verify took $(( $(date +%s) - t0 ))s"

echo 4 >"$PFD/sriov_numvfs"
for _ in $(seq 1 60); do
    ok=1
    for i in 0 1 2 3; do
        [ -L "$PFD/virtfn$i" ] && [ -e "/sys/bus/pci/devices/$(basename "$(readlink "$PFD/virtfn$i")")" ] \
            && [ -L "$PFD/virtfn$i/driver" ] || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.5
done
udevadm settle --timeout=20 2>/dev/null
expect_eq sriov-numvfs-4 "$(cat "$PFD/sriov_numvfs")" 4
check four-virtfn-links test -L "$PFD/virtfn3" -a ! -e "$PFD/virtfn4"
t0=$(date +%s)
check capture-after-vfs bash "$CAP" "$W/after-vfs"
note "capture took $(( $(date +%s) - t0 ))s"
check after-tree-valid verify_tree "$W/after-vfs"
expect_eq after-device-count "$(count "$W/after-vfs")" "$(count /)"
expect_eq after-four-more-devices "$(count "$W/after-vfs")" "$(( $(count "$W/before") + 4 ))"
check after-has-physfn test -L "$W/after-vfs/sys/bus/pci/devices/$(basename "$(readlink "$PFD/virtfn0")")/physfn"

# Reproducible: a second capture of the same state is identical.
bash "$CAP" "$W/again" && check capture-deterministic diff -r --no-dereference "$W/after-vfs" "$W/again"
rm -rf "$W/again"
check tar-to-host tar -C "$W" --sort=name -cf "$PT_OUT/captures.tar" before after-vfs

# Facts for the README (stays in PT_OUT, not part of the fixtures).
{
    echo "kernel: $(uname -r)"
    echo "cmdline: $(tr ' ' '\n' </proc/cmdline | grep -E '^(intel_iommu|iommu)=' | tr '\n' ' ')"
    echo "default route: $(ip route show default)"
    echo
    for d in /sys/bus/pci/devices/*; do
        a="$(basename "$d")"
        drv="$( [ -L "$d/driver" ] && basename "$(readlink "$d/driver")" || echo -)"
        grp="$( [ -L "$d/iommu_group" ] && basename "$(readlink "$d/iommu_group")" || echo -)"
        nets="$(ls "$d/net" 2>/dev/null | tr '\n' ' ')"
        printf '%s %s:%s class=%s driver=%s group=%s net=%s\n' "$a" "$(cat "$d/vendor")" "$(cat "$d/device")" \
            "$(cat "$d/class")" "$drv" "$grp" "${nets:--}"
    done
    echo
    lspci -nn 2>/dev/null
} >"$PT_OUT/guest-info.txt"
finish
