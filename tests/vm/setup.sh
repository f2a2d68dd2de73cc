#!/usr/bin/env bash
# Installs what the real-kernel VM test bed needs (idempotent; a fast no-op when all is present).
#   - Debian bookworm-backports: qemu-system-x86 (10.x), linux-image-amd64 (6.12)
#   - Debian: busybox-static (guest DHCP), kmod, udev (guest module autoload, NIC names), pciutils,
#     jq, iproute2, util-linux, python3-venv, and the tools the scenarios and the install check
#     use (below)
#   - PyPI: virtme-ng (pinned) in its own venv, $PT_VNG_VENV (default /opt/virtme-ng)
# Must run as root. Works without systemd, without a TTY and without a real bootloader.
set -euo pipefail

VNG_VERSION="${PT_VNG_VERSION:-1.38}"
VNG_VENV="${PT_VNG_VENV:-/opt/virtme-ng}"
BPO_LIST=/etc/apt/sources.list.d/bookworm-backports.sources
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

# Scenario tools: dbus (a real system bus in the guest), strace (kills the daemon at an exact
# sysfs write), e2fsprogs (a mounted disk for the guard), dpdk + driverctl (benchmark baselines),
# cpu-checker + libvirt-clients (kvm-ok and virt-host-validate, compared with our host report);
# libvirt-daemon + its QEMU driver: a real libvirtd runs our hook in leases.sh.
# libudev-dev + pkg-config: the daemon's udev crate builds against libudev (from backports, with
# the same version as the backports libudev1 that udev pulls in).
# The install check (tests/install.sh): systemd (systemd-analyze verify/security of the unit; it
# runs without systemd as PID 1), libxml2-utils (xmllint), polkitd (polkit's policyconfig DTD),
# libdbus-1-dev (D-Bus's introspection DTD), groff-base (rendering the man pages).
PKGS=(qemu-system-x86 linux-image-amd64 busybox-static kmod udev pciutils jq iproute2 util-linux python3-venv
      dbus strace e2fsprogs dpdk driverctl cpu-checker libvirt-clients libudev-dev pkg-config
      systemd libxml2-utils polkitd libdbus-1-dev groff-base
      libvirt-daemon libvirt-daemon-driver-qemu)

kernel_image() {
    # Newest 6.12+ Debian kernel image in /boot.
    ls -1 /boot/vmlinuz-6.1[2-9]* /boot/vmlinuz-6.[2-9]* 2>/dev/null | sort -V | tail -n1 || true
}

need_apt=0
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || { need_apt=1; break; }
done
qemu_ver="$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p' || true)"
[ "${qemu_ver:-0}" -ge 10 ] 2>/dev/null || need_apt=1
[ -n "$(kernel_image)" ] || need_apt=1

if [ "$need_apt" = 1 ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
        [ -n "$mirror" ] || { log "cannot derive the Debian mirror from debian.sources"; exit 1; }
        log "adding bookworm-backports from the existing Debian mirror"
        cat > "$BPO_LIST" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    # No bootloader and no Debian initrd are needed: vng boots /boot/vmlinuz-* directly with its
    # own initramfs. --no-install-recommends keeps grub and firmware out; INITRD=No makes the
    # kernel's initramfs-tools postinst hook skip its build (the hooks run fine without systemd).
    apt-get update -q
    INITRD=No apt-get install -y -q --no-install-recommends -t bookworm-backports \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PKGS[@]}"
fi

if [ ! -x "$VNG_VENV/bin/vng" ] || [ "$("$VNG_VENV/bin/pip" show virtme-ng 2>/dev/null | sed -n 's/^Version: //p')" != "$VNG_VERSION" ]; then
    log "installing virtme-ng==$VNG_VERSION into $VNG_VENV"
    /usr/bin/python3 -m venv "$VNG_VENV"
    "$VNG_VENV/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
fi

k="$(kernel_image)"
[ -n "$k" ] || { log "no 6.12+ kernel in /boot after install"; exit 1; }
kver="${k#/boot/vmlinuz-}"
[ -d "/lib/modules/$kver/kernel" ] || { log "modules for $kver missing"; exit 1; }
echo "qemu:   $(qemu-system-x86_64 --version | head -n1)"
echo "vng:    $("$VNG_VENV/bin/vng" --version 2>&1 | head -n1)"
echo "kernel: $k (modules /lib/modules/$kver)"
