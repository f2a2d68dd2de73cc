#!/usr/bin/env bash
# Benchmark (issue 4): 7 igb VFs created and bound to vfio-pci with
#   passthroughctl vf create PF --count 7 --assign --runtime
# vs the naive bare sequence users write today (numvfs=7 with autoprobe on, so igbvf binds each
# VF, then override/unbind/probe each) vs the best bare sequence (autoprobe off, numvfs=7,
# override/probe each, autoprobe back on). Median of $PT_BENCH_ROUNDS (5) rounds each, a reset to
# 0 VFs between rounds; prints medians and ratios to $PT_OUT/bench-sriov.txt. The checks only
# assert that each method really bound all 7 (timings are reported, not asserted).
#
# Then hotplug (issue 15): from `echo 7 > sriov_numvfs` done by hand (autoprobe on, so igbvf binds
# each VF as it appears) until all 7 are on vfio-pci, with nothing asked of anyone:
# - passthroughd: the daemon running with `[[device]] match` = the VF ids and the shipped udev rule;
# - driverctl: overrides saved for the 7 VF addresses, and a udev rule running what driverctl's
#   unit runs for them (`driverctl load-override`; its own rule starts a systemd unit per device,
#   and this guest has no systemd, so the unit's start-up cost is left out in driverctl's favour);
# - bare udev rule: a rule matching the VF ids that does the three writes itself.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"
ROUNDS="${PT_BENCH_ROUNDS:-5}"

pf="$(find_dev 0x8086 0x10c9)"
P="$SYS/$pf"
modprobe igbvf
modprobe vfio-pci
start_system_bus
# Started in this shell, not inside `check` (a subshell), so stop_daemon knows its pid.
start_daemon
check daemon-starts "$CTL" status

vfs() { local i; for i in 0 1 2 3 4 5 6; do basename "$(readlink "$P/virtfn$i")"; done; }
all_on_vfio() {
    [ "$(cat "$P/sriov_numvfs")" = 7 ] || return 1
    local a; for a in $(vfs); do [ "$(driver_of "$a")" = vfio-pci ] || return 1; done
}
reset() { echo 0 > "$P/sriov_numvfs" && echo 1 > "$P/sriov_drivers_autoprobe"; }

naive() {
    local a
    echo 7 > "$P/sriov_numvfs"
    for a in $(vfs); do
        echo vfio-pci > "$SYS/$a/driver_override"
        [ -e "$SYS/$a/driver" ] && echo "$a" > "$SYS/$a/driver/unbind"
        echo "$a" > /sys/bus/pci/drivers_probe
    done
}
best() {
    local a
    echo 0 > "$P/sriov_drivers_autoprobe"
    echo 7 > "$P/sriov_numvfs"
    for a in $(vfs); do
        echo vfio-pci > "$SYS/$a/driver_override"
        echo "$a" > /sys/bus/pci/drivers_probe
    done
    echo 1 > "$P/sriov_drivers_autoprobe"
}
ours() { "$CTL" vf create "$pf" --count 7 --assign --runtime >/dev/null; }

declare -A MEDIAN
measure() {
    local name="$1" run="$2" i t0 t1 times=()
    # One untimed round first (cold caches: the daemon's first create), as in bench-assign.sh.
    reset; quiesce; $run
    for i in $(seq "$ROUNDS"); do
        reset
        quiesce
        t0=$(date +%s%N); $run; t1=$(date +%s%N)
        if ! all_on_vfio; then
            expect_eq "$name-binds-all-7" "$(for a in $(vfs); do driver_of "$a"; done | sort | uniq -c | tr '\n' ' ')" "7 vfio-pci"
            reset; return
        fi
        times+=($(( (t1 - t0) / 1000 )))
    done
    reset
    MEDIAN[$name]=$(median "${times[@]}")
    expect_eq "$name-binds-all-7" ok ok
    note "$name: median $((MEDIAN[$name] / 1000)) ms over $ROUNDS rounds (all: $(printf '%s ' "${times[@]}")us)"
}

measure naive naive
measure best best
measure passthroughctl ours
expect_eq autoprobe-restored "$(cat "$P/sriov_drivers_autoprobe")" 1

{
    echo "create 7 igb VFs on vfio-pci (median of $ROUNDS, guest under TCG):"
    for m in naive best passthroughctl; do
        [ -n "${MEDIAN[$m]:-}" ] && printf '  %-15s %8.1f ms\n' "$m" "$(awk -v u="${MEDIAN[$m]}" 'BEGIN{print u/1000}')"
    done
    echo "  passthroughctl / best bare: $(ratio "${MEDIAN[passthroughctl]:-0}" "${MEDIAN[best]:-0}")x (target <= 1.2)"
    echo "  naive bare / passthroughctl: $(ratio "${MEDIAN[naive]:-0}" "${MEDIAN[passthroughctl]:-0}")x (target > 1)"
} | tee "$PT_OUT/bench-sriov.txt"
stop_daemon

# --- Hotplug ---
VFIO=/sys/bus/pci/drivers/vfio-pci
RULES=/etc/udev/rules.d
reset; quiesce
echo 7 > "$P/sriov_numvfs"
read -r -a VF_ADDRS <<< "$(vfs | tr '\n' ' ')"
reset; quiesce
# Pure bash (no process per poll): the poller must not starve the udev workers it waits for.
all_vfs_on_vfio() { local a; for a in "${VF_ADDRS[@]}"; do [ -e "$VFIO/$a" ] || return 1; done; }
rules_only() { rm -f "$RULES"/70-passthroughd.rules "$RULES"/70-bench-*.rules; [ -z "${1:-}" ] || printf '%s\n' "$1" > "$RULES/70-bench-$2.rules"; udevadm control --reload; }
appear() {
    echo 7 > "$P/sriov_numvfs"
    CREATED_US=${EPOCHREALTIME/./}
    local until=$((SECONDS + 30))
    while ! all_vfs_on_vfio; do [ "$SECONDS" -lt "$until" ] || return 1; done
}
measure_hotplug() {
    local name="$1" i t0 t1 times=() made=()
    reset; quiesce; appear
    for i in $(seq "$ROUNDS"); do
        reset
        quiesce
        t0=$(date +%s%N)
        if ! appear; then
            expect_eq "$name-claims-all-7" "$(for a in "${VF_ADDRS[@]}"; do driver_of "$a"; done | sort | uniq -c | tr '\n' ' ')" "7 vfio-pci"
            reset; quiesce; return
        fi
        t1=$(date +%s%N)
        times+=($(( (t1 - t0) / 1000 )))
        made+=($(( CREATED_US - t0 / 1000 )))
    done
    reset; quiesce
    MEDIAN[$name]=$(median "${times[@]}")
    expect_eq "$name-claims-all-7" ok ok
    note "hotplug $name: median $((MEDIAN[$name] / 1000)) ms over $ROUNDS rounds (all: $(printf '%s ' "${times[@]}")us); the echo returned after a median $(( $(median "${made[@]}") / 1000 )) ms"
}

mkdir -p /etc/passthroughd
printf 'version = 1\n\n[[device]]\nmatch = { vendor = "0x8086", device = "0x10ca" }\n' > /etc/passthroughd/config.toml
rules_only
sed "s|/usr/bin/passthroughd|$PTD --state-dir $STATE_DIR|" "$PT_REPO/systemd/70-passthroughd.rules" > "$RULES/70-passthroughd.rules"
udevadm control --reload
start_daemon
check daemon-starts-with-match-config "$CTL" status
measure_hotplug passthroughd
stop_daemon
rm -f /etc/passthroughd/config.toml
# Nothing of the daemon's left on the VFs for the next methods.
for a in "${VF_ADDRS[@]}"; do [ ! -e "$SYS/$a" ] || note "VF $a still present after reset"; done

mkdir -p /etc/driverctl.d
for a in "${VF_ADDRS[@]}"; do echo vfio-pci > "/etc/driverctl.d/pci-$a"; done
rules_only 'ACTION=="add", SUBSYSTEM=="pci", TEST=="/etc/driverctl.d/pci-$kernel", RUN+="/usr/sbin/driverctl load-override pci/$kernel"' driverctl
measure_hotplug driverctl
rm -f /etc/driverctl.d/pci-*

rules_only 'ACTION=="add", SUBSYSTEM=="pci", ATTR{vendor}=="0x8086", ATTR{device}=="0x10ca", RUN+="/bin/sh -c '"'"'echo vfio-pci > /sys%p/driver_override; [ -e /sys%p/driver ] && echo %k > /sys%p/driver/unbind; echo %k > /sys/bus/pci/drivers_probe'"'"'"' bare
measure_hotplug bare-udev-rule
rules_only

{
    echo "hotplug: 7 igb VFs from echo 7 > sriov_numvfs to all on vfio-pci (median of $ROUNDS, guest under TCG):"
    for m in passthroughd driverctl bare-udev-rule; do
        [ -n "${MEDIAN[$m]:-}" ] && printf '  %-15s %8.1f ms\n' "$m" "$(awk -v u="${MEDIAN[$m]}" 'BEGIN{print u/1000}')"
    done
    echo "  passthroughd / bare udev rule: $(ratio "${MEDIAN[passthroughd]:-0}" "${MEDIAN[bare-udev-rule]:-0}")x"
    echo "  driverctl / passthroughd: $(ratio "${MEDIAN[driverctl]:-0}" "${MEDIAN[passthroughd]:-0}")x"
} | tee -a "$PT_OUT/bench-sriov.txt"
finish
