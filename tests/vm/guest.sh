#!/usr/bin/env bash
# Runs inside the guest (started by run.sh through vng --exec) as root:
#   guest.sh SCENARIO [ARGS...]   with PT_BIN, PT_REPO, PT_OUT in the environment.
# Loads the modules the scenarios need, then runs the scenario with bash.
set -u
export PT_BIN PT_REPO PT_OUT
export PT_IN_GUEST=1
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export PT_RESULTS="$PT_OUT/results.txt"
scen="$1"; shift
rm -f "$PT_RESULTS"
# vng shares the host's root over 9p without a cache, so every exec re-reads the program from
# the host: `passthroughctl --help` took 260 ms, `python3 -c pass` 480 ms, where a real host's page
# cache makes that a few ms. run.sh exports the root a second time (tag ptcache); mounted with
# cache=loose over /usr and the binaries under test, it gives every tool in the scenarios, ours and
# the ones compared with, a page cache as a local disk would. The host changes none of these
# files while the guest runs.
if mkdir -p /run/pt-root && mount -t 9p -o ro,trans=virtio,version=9p2000.L,access=any,cache=loose ptcache /run/pt-root; then
    for d in /usr "$PT_BIN"; do
        mount --bind "/run/pt-root$d" "$d" || echo "guest: could not give $d a page cache"
    done
else
    echo "guest: no cached 9p view of the host root; programs load uncached (slow)"
fi
# The kernel's log as it happens, on the host side: it survives a guest that dies mid-scenario.
dmesg -w >"$PT_OUT/dmesg.txt" 2>&1 &
echo "guest: kernel $(uname -r), cmdline: $(cat /proc/cmdline | tr ' ' '\n' | grep -E '^(intel_iommu|iommu)=' | tr '\n' ' ')"
# udev normally autoloads NIC drivers; load them explicitly so the scenario never races it.
for m in vfio-pci igb e1000e e1000 pcnet32; do
    modprobe "$m" 2>/dev/null || echo "guest: modprobe $m failed"
done
command -v udevadm >/dev/null && udevadm settle --timeout=20 2>/dev/null
# Default route through vng's virtio-net (QEMU user net). vng's DHCP can lose a race with udev
# renaming the interface; then configure QEMU's fixed user-net addresses ourselves.
for _ in $(seq 1 20); do [ -n "$(ip route show default)" ] && break; sleep 0.5; done
if [ -z "$(ip route show default)" ]; then
    for d in /sys/bus/virtio/drivers/virtio_net/virtio*/net/*; do
        [ -e "$d" ] || continue
        ifc="${d##*/}"
        ip link set "$ifc" up && ip addr add 10.0.2.15/24 dev "$ifc" && ip route add default via 10.0.2.2 dev "$ifc" \
            && echo "guest: DHCP did not finish; configured $ifc statically (10.0.2.15/24 via 10.0.2.2)"
        break
    done
fi
cd "$PT_REPO" 2>/dev/null || cd /
bash "$scen" "$@"
rc=$?
if ! grep -q '^DONE ' "$PT_RESULTS" 2>/dev/null; then
    echo "FAIL scenario (exited with status $rc before calling finish)" | tee -a "$PT_RESULTS"
fi
sync
exit "$rc"
