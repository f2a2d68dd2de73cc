#!/usr/bin/env bash
# The demo (`make demo`): the real daemon on a system bus inside the VM, and the CLI walked through
# as a recorded terminal session: host, list, groups, vf create --assign, assign, an unsafe assign
# refused with its reason, apply --dry-run and apply of a small config, a restart that keeps
# everything, verify of a VF through VFIO, the libvirt hook leasing a VF (and refusing a second
# domain), release. Every step is also a check (its exit status, and the drivers it leaves),
# so the demo fails rather than rots. The transcript is kept in $PT_OUT/demo.txt.
# The short form (`make test`: `run.sh demo.sh --short`, as run.sh passes only its arguments into
# the guest; or PT_DEMO_SHORT=1 in the guest): list, assign, the refusal, apply --dry-run, apply,
# release.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
SHORT="${PT_DEMO_SHORT:-0}"
[ "${1:-}" = --short ] && SHORT=1
[ "$SHORT" = 1 ] && note "short form"
TRANSCRIPT="$PT_OUT/demo.txt"
: >"$TRANSCRIPT"
export PATH="$PT_BIN:$PATH"   # the session types `passthroughctl`, as on an installed host
CONFIG=/etc/passthroughd/config.toml

pf="$(find_dev 0x8086 0x10c9)"
e1000e="$(find_dev 0x8086 0x10d3)"
e1000="$(find_dev 0x8086 0x100e)"
pcnet="$(find_dev 0x1022 0x2000)"
route_if="$(ip route show default | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)"
route_nic="$(readlink -f "/sys/class/net/$route_if" | grep -o '[0-9a-f]\{4\}:[0-9a-f]\{2\}:[0-9a-f]\{2\}\.[0-7]' | tail -n1)"

# Checks write their PASS/FAIL lines to the results only: the console shows the session.
quiet() { "$@" >/dev/null; }
say() { printf '\n# %s\n' "$*" | tee -a "$TRANSCRIPT"; }
# step NAME EXIT COMMAND...: prints "$ COMMAND" and its output (stdout and stderr, as a terminal
# shows them), and checks the exit status.
step() {
    local name="$1" want="$2" rc; shift 2
    printf '$ %s\n' "$*" | tee -a "$TRANSCRIPT"
    "$@" >"$PT_OUT/step.out" 2>&1; rc=$?
    tee -a "$TRANSCRIPT" <"$PT_OUT/step.out"
    [ "$rc" = 0 ] || printf '[exit status %s]\n' "$rc" | tee -a "$TRANSCRIPT"
    quiet expect_eq "demo-$name-exit" "$rc" "$want"
}
drivers() { local d; for d in "$@"; do printf '%s ' "$(driver_of "$d")"; done; }
quiet check demo-devices-found test -n "$pf" -a -n "$e1000e" -a -n "$e1000" -a -n "$pcnet" -a -n "$route_nic"

say "passthroughd demo: kernel $(uname -r), $(ls /sys/kernel/iommu_groups | wc -l) IOMMU groups, QEMU q35 with intel-iommu"
say "the daemon on the system bus (as systemd's unit starts it)"
printf '$ passthroughd --bus system &\n' | tee -a "$TRANSCRIPT"
start_system_bus
quiet check demo-daemon-starts start_daemon

if [ "$SHORT" != 1 ]; then
    say "what this host can do for passthrough (one verdict per check, the first fix last)"
    step host 0 passthroughctl host
fi
say "every PCI function, its driver and IOMMU group"
step list 0 passthroughctl list
quiet check demo-list-shows-igb grep -q "$pf" "$PT_OUT/step.out"
if [ "$SHORT" != 1 ]; then
    say "IOMMU groups: $e1000 and $pcnet share one with the PCIe-to-PCI bridge"
    step groups 0 passthroughctl groups
    say "two VFs of the igb NIC, straight to vfio-pci (no host VF driver ever probes them)"
    step vf-create 0 passthroughctl vf create "$pf" --count 2 --assign
    quiet expect_eq demo-vfs-on-vfio "$(drivers "$(basename "$(readlink "$SYS/$pf/virtfn0")")" \
        "$(basename "$(readlink "$SYS/$pf/virtfn1")")")" "vfio-pci vfio-pci "
fi

say "the e1000e NIC to vfio-pci, kept across restarts"
step assign 0 passthroughctl assign "$e1000e"
quiet expect_eq demo-assign-on-vfio "$(driver_of "$e1000e")" vfio-pci

say "the NIC carrying the default route is refused, with the reason"
step assign-route-refused 5 passthroughctl assign "$route_nic"
quiet check demo-refusal-names-the-route grep -qi "route" "$PT_OUT/step.out"
quiet expect_eq demo-route-nic-untouched "$(driver_of "$route_nic")" virtio-pci

say "a declarative config: the bridged pair, as one IOMMU group"
mkdir -p /etc/passthroughd
cat > "$CONFIG" <<EOF
version = 1

[[device]]
address = "$e1000"
group = true
EOF
step show-config 0 cat "$CONFIG"
step reload 0 passthroughctl reload
step apply-dry-run 0 passthroughctl apply --dry-run
quiet check demo-dry-run-shows-the-plan grep -q "$e1000" "$PT_OUT/step.out"
quiet expect_eq demo-dry-run-changes-nothing "$(drivers "$e1000" "$pcnet")" "e1000 pcnet32 "
step apply 0 passthroughctl apply
quiet expect_eq demo-apply-did-it "$(drivers "$e1000" "$pcnet")" "vfio-pci vfio-pci "

if [ "$SHORT" != 1 ]; then
    say "a restart (systemctl restart passthroughd): the assignments and the config are kept"
    printf '$ kill -TERM %s; passthroughd --bus system &\n' "$(daemon_pid)" | tee -a "$TRANSCRIPT"
    stop_daemon
    quiet check demo-daemon-restarts start_daemon
    step status 0 passthroughctl status
    quiet expect_eq demo-kept-after-restart "$(drivers "$e1000e" "$e1000" "$pcnet" \
        "$(basename "$(readlink "$SYS/$pf/virtfn0")")" "$(basename "$(readlink "$SYS/$pf/virtfn1")")")" \
        "vfio-pci vfio-pci vfio-pci vfio-pci vfio-pci "
    quiet check demo-status-after-restart-lists-them grep -q "$e1000e .*request" "$PT_OUT/step.out"
fi

if [ "$SHORT" != 1 ]; then
    vf0="$(basename "$(readlink "$SYS/$pf/virtfn0")")"
    vf1="$(basename "$(readlink "$SYS/$pf/virtfn1")")"
    say "is VF 0 really ready for a VM? open it through VFIO the way QEMU does"
    step verify 0 passthroughctl verify "$vf0"
    quiet check demo-verify-ready grep -q "ready for a VM" "$PT_OUT/step.out"
    say "the <hostdev> for a libvirt domain; the libvirt hook leases it when the domain starts"
    step show-libvirt 0 passthroughctl show "$vf1" --libvirt
    printf "<domain type='kvm'>\n  <name>win11</name>\n  <devices>\n%s\n  </devices>\n</domain>\n" \
        "$(cat "$PT_OUT/step.out")" > "$PT_OUT/win11.xml"
    step hook-prepare 0 sh -c "passthroughctl libvirt-hook win11 prepare begin - < $PT_OUT/win11.xml"
    step lease-list 0 passthroughctl lease list
    quiet check demo-lease-listed grep -q "libvirt:win11" "$PT_OUT/step.out"
    say "a second domain wanting the same VF is refused, naming the first"
    sed 's/win11/ubuntu/' "$PT_OUT/win11.xml" > "$PT_OUT/ubuntu.xml"
    step hook-second-refused 5 sh -c "passthroughctl libvirt-hook ubuntu prepare begin - < $PT_OUT/ubuntu.xml"
    step hook-release 0 sh -c "passthroughctl libvirt-hook win11 release end - < $PT_OUT/win11.xml"
    quiet expect_eq demo-assigned-vf-stays-after-lease "$(driver_of "$vf1")" vfio-pci
fi

say "the e1000e back to its host driver"
step release 0 passthroughctl release "$e1000e"
quiet expect_eq demo-release-restores "$(driver_of "$e1000e")" e1000e

stop_daemon
say "done: $(grep -c '^PASS' "$PT_RESULTS") checks passed, $(grep -c '^FAIL' "$PT_RESULTS") failed"
note "scenario ran ${SECONDS}s (guest time, boot excluded)"
finish
