#!/usr/bin/env bash
# Scenario (issue 14): passthroughd as `make install` lays it out. The Makefile's vm target
# installs into $PT_OUT/root (PREFIX=/usr) before the guest boots; here the daemon and the CLI run
# from that tree, on a system bus that reads the installed bus policy, and the root daemon runs
# with the installed unit's CapabilityBoundingSet= and NoNewPrivileges= (as systemd would start
# it; there is no systemd in the guest). Root may assign and release; an unprivileged user may
# list but not assign (exit 3: no polkit agent, fail closed); an unprivileged daemon cannot own
# the name (exit 69).
. "$PT_REPO/tests/vm/lib.sh"
ROOT="$PT_OUT/root"
PT_BIN="$ROOT/usr/bin"   # common.sh's PTD and CTL: the installed binaries
. "$PT_REPO/tests/vm/scenarios/common.sh"
UNIT="$ROOT/usr/lib/systemd/system/passthroughd.service"
POLICY="$ROOT/usr/share/dbus-1/system.d/org.passthroughd.Passthrough1.conf"

check installed-tree-present test -x "$PTD" -a -x "$CTL" -a -f "$UNIT" -a -f "$POLICY"
[ -x "$PTD" ] || { note "no install tree in $ROOT: run this through make vm (it installs first)"; finish; }
# The installed files sit on the host's read-write share (uncached 9p); the same files through
# the cached read-only view load as from a local disk (see guest.sh).
mount --bind "/run/pt-root$PT_BIN" "$PT_BIN" 2>/dev/null || note "installed binaries load uncached"
expect_eq unit-execstart "$(sed -n 's/^ExecStart=//p' "$UNIT")" "/usr/bin/passthroughd --bus system"

e1000e="$(find_dev 0x8086 0x10d3)"
check e1000e-found test -n "$e1000e"

# The unit's capability bounding set, as setpriv spells it (-all,+sys_admin,...).
unit_caps="$(sed -n 's/^CapabilityBoundingSet=//p' "$UNIT")"
bounding="-all$(for c in $unit_caps; do printf ',+%s' "$(echo "${c#CAP_}" | tr 'A-Z' 'a-z')"; done)"
note "unit capabilities: $unit_caps"
# Their bits, for the check of what the running daemon holds (capability.h numbers).
declare -A CAPNO=([CAP_DAC_OVERRIDE]=1 [CAP_DAC_READ_SEARCH]=2 [CAP_SYS_MODULE]=16
    [CAP_SYS_RAWIO]=17 [CAP_SYS_PTRACE]=19 [CAP_SYS_ADMIN]=21)
mask=0
for c in $unit_caps; do
    [ -n "${CAPNO[$c]:-}" ] || { check "capability-$c-known-to-this-scenario" false; continue; }
    mask=$((mask | (1 << CAPNO[$c])))
done

start_system_bus "$POLICY"
check daemon-starts-with-unit-capabilities start_daemon setpriv --no-new-privs --bounding-set "$bounding" --inh-caps -all
pid="$(daemon_pid)"
expect_eq daemon-capabilities "$(sed -n 's/^CapEff:\t*//p' /proc/$pid/status)" "$(printf '%016x' "$mask")"
expect_eq daemon-no-new-privs "$(sed -n 's/^NoNewPrivs:\t*//p' /proc/$pid/status)" 1
expect_eq daemon-runs-installed-binary "$(readlink /proc/$pid/exe)" "$PTD"
expect_eq version-matches "$("$CTL" --json status | jq -r .version)" "$("$PTD" --version | cut -d' ' -f2)"

exit_is root-list 0 "$CTL" --json list
expect_eq root-list-covers-every-function "$(jq length "$PT_OUT/last.out")" "$(ls $SYS | wc -l)"
exit_is root-assign 0 "$CTL" assign --runtime "$e1000e"
expect_eq root-assign-on-vfio "$(driver_of "$e1000e")" vfio-pci
exit_is root-release 0 "$CTL" release --runtime "$e1000e"
expect_eq root-release-restores "$(driver_of "$e1000e")" e1000e

nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
exit_is unprivileged-list-allowed 0 nobody "$CTL" list
check unprivileged-list-shows-e1000e grep -q "$e1000e" "$PT_OUT/last.out"
exit_is unprivileged-assign-denied 3 nobody "$CTL" assign "$e1000e"
check unprivileged-denial-says-why grep -qi "permission\|not authorized\|denied" "$PT_OUT/last.err"
expect_eq unprivileged-changes-nothing "$(driver_of "$e1000e")" e1000e

mkdir -p /tmp/nobody-state && chown 65534:65534 /tmp/nobody-state
exit_is unprivileged-daemon-cannot-own-the-name 69 nobody timeout 60 "$PTD" --bus system \
    --state-dir /tmp/nobody-state --config /tmp/nobody-state/none.toml
check unprivileged-owner-refused-by-policy grep -q "not allowed to own the service" "$PT_OUT/last.err"
check root-daemon-still-serves "$CTL" status

stop_daemon
note "scenario ran ${SECONDS}s (guest time, boot excluded)"
finish
