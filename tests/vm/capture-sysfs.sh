#!/usr/bin/env bash
# capture-sysfs.sh DEST — copy what a PCI inventory needs from the live /sys into DEST, so that
# DEST works as a fake sysfs root (DEST/sys/bus/pci/devices/... mirrors /sys/bus/pci/devices/...).
# Runs inside the guest. Layout contract (other code depends on it):
#   DEST/sys/bus/pci/devices/ADDR        symlink, target verbatim (../../../devices/pci0000:00/...)
#   DEST/sys/devices/.../ADDR/           directory, with regular files (content exactly as read):
#       uevent vendor device subsystem_vendor subsystem_device class revision numa_node boot_vga
#       driver_override enable sriov_totalvfs sriov_numvfs sriov_drivers_autoprobe sriov_offset
#       sriov_stride reset_method local_cpulist irq        (when present and readable)
#     and symlinks, targets verbatim: driver, iommu_group, physfn, virtfnN
#   DEST/sys/bus/pci/drivers/NAME/       for every driver a device is bound to, with its
#                                        ADDR -> verbatim symlinks to the bound devices
#   DEST/sys/kernel/iommu_groups/N/type  file;  .../N/devices/ADDR -> verbatim symlinks
# Deterministic: content comes only from sysfs (no timestamps); walks are in C-locale order.
set -euo pipefail
export LC_ALL=C

[ $# = 1 ] || { echo "usage: $0 DEST" >&2; exit 2; }
DEST="$1"
SYS="${PT_SYSFS:-/sys}"     # the live sysfs (overridable only to test this script)
ATTRS="uevent vendor device subsystem_vendor subsystem_device class revision numa_node boot_vga
driver_override enable sriov_totalvfs sriov_numvfs sriov_drivers_autoprobe sriov_offset
sriov_stride reset_method local_cpulist irq"

shopt -s nullglob
rm -rf "$DEST"
mkdir -p "$DEST/sys/bus/pci/devices" "$DEST/sys/bus/pci/drivers" "$DEST/sys/kernel/iommu_groups" "$DEST/sys/devices"

# Few processes per device: forks are slow under TCG, so use bash builtins where possible.
copy_file() {  # SRC DST: exact content as cat reads it; skip silently when unreadable
    local v=
    { IFS= read -r -d '' v; } <"$1" 2>/dev/null || true  # read ends at EOF: status 1
    if [ -n "$v" ]; then
        printf '%s' "$v" >"$2"
    elif cat "$1" >/dev/null 2>&1; then     # empty attribute (rare): keep it, empty
        : >"$2"
    fi
    return 0
}
LINK=
read_link() { LINK="$(readlink "$1")"; }   # sets LINK to the verbatim target
normalize() {  # DIR REL -> NORM: DIR/REL with . and .. removed (DIR relative, no leading /)
    local -a out=() parts
    local p
    IFS=/ read -r -a parts <<<"$1/$2"
    for p in "${parts[@]}"; do
        case "$p" in ''|.) ;; ..) if [ ${#out[@]} -gt 0 ]; then unset 'out[${#out[@]}-1]'; fi ;; *) out+=("$p") ;; esac
    done
    local IFS=/; NORM="${out[*]}"
    return 0
}
base() { BASE="${1##*/}"; }

declare -A drivers=()
for src in "$SYS"/bus/pci/devices/*; do
    addr="${src##*/}"
    read_link "$src"
    ln -s "$LINK" "$DEST/sys/bus/pci/devices/$addr"
    normalize "sys/bus/pci/devices" "$LINK"; rel="$NORM"          # sys/devices/pci0000:00/.../ADDR
    real="$SYS/${rel#sys/}"
    [ -d "$real" ] || { echo "capture-sysfs: $src -> $LINK does not resolve under $SYS" >&2; exit 1; }
    ddir="$DEST/$rel"
    mkdir -p "$ddir"
    for a in $ATTRS; do
        if [ -f "$real/$a" ]; then copy_file "$real/$a" "$ddir/$a"; fi
    done
    for l in "$real"/driver "$real"/iommu_group "$real"/physfn "$real"/virtfn*; do
        [ -L "$l" ] || continue
        read_link "$l"
        ln -s "$LINK" "$ddir/${l##*/}"
        base "$LINK"
        case "${l##*/}" in
            driver) drivers["$BASE"]=1 ;;
            iommu_group) mkdir -p "$DEST/sys/kernel/iommu_groups/$BASE" ;;
        esac
    done
done

# Driver directories (names may contain spaces, e.g. "i6300ESB timer"), with their device links.
addr_re='^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$'
for drv in "${!drivers[@]}"; do
    mkdir -p "$DEST/sys/bus/pci/drivers/$drv"
    for l in "$SYS/bus/pci/drivers/$drv"/*; do
        [[ "${l##*/}" =~ $addr_re ]] && [ -L "$l" ] || continue
        read_link "$l"
        ln -s "$LINK" "$DEST/sys/bus/pci/drivers/$drv/${l##*/}"
    done
done

for gd in "$SYS"/kernel/iommu_groups/*; do
    g="${gd##*/}"
    mkdir -p "$DEST/sys/kernel/iommu_groups/$g/devices"
    [ ! -f "$gd/type" ] || copy_file "$gd/type" "$DEST/sys/kernel/iommu_groups/$g/type"
    for l in "$gd"/devices/*; do
        read_link "$l"
        ln -s "$LINK" "$DEST/sys/kernel/iommu_groups/$g/devices/${l##*/}"
    done
done
