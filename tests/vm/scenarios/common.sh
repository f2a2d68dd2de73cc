# Shared helpers for scenarios: what the kernel says, read straight from sysfs, in the same
# one-line-per-item form the inventory's JSON is turned into, so the two can be diffed.
SYS=/sys/bus/pci/devices
PTD="$PT_BIN/passthroughd"

# First function with vendor:device (e.g. 0x8086 0x10c9).
find_dev() {
    local d
    for d in "$SYS"/*; do
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "$1:$2" ] && { basename "$d"; return 0; }
    done
    return 1
}

# Every function with vendor:device, one per line in address order (the VM has two igb PFs).
find_devs() {
    local d
    for d in "$SYS"/*; do
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "$1:$2" ] && basename "$d"
    done
}

link_name() { local t; t="$(readlink "$1" 2>/dev/null)" && basename "$t" || echo -; }

# addr vendor device class driver group, decimal ids, one line per function.
kernel_functions() {
    local d
    for d in "$SYS"/*; do
        printf '%s %d %d %d %s %s\n' "$(basename "$d")" "$(cat "$d/vendor")" "$(cat "$d/device")" \
            "$(cat "$d/class")" "$(link_name "$d/driver")" "$(link_name "$d/iommu_group")"
    done | sort
}
inventory_functions() {
    jq -r '.functions[] | "\(.address) \(.vendor_id) \(.device_id) \(.class) \(.driver // "-") \(.iommu_group // "-")"' "$1" | sort
}

# group viable members..., where viable is computed here from the kernel's driver links with the
# rule of docs/safety.md ("The group rule").
kernel_groups() {
    local g m drv viable members
    for g in /sys/kernel/iommu_groups/*; do
        viable=true; members=""
        for m in $(ls "$g/devices" | sort); do
            members="$members $m"
            drv="$(link_name "$g/devices/$m/driver")"
            case "$drv" in -|vfio-pci|pci-stub|pcieport) ;; *) viable=false ;; esac
        done
        echo "$(basename "$g") $viable$members"
    done | sort -n
}
inventory_groups() {
    jq -r '.groups[] | "\(.id) \(.viable) \(.members | join(" "))"' "$1" | sort -n
}

# Binds one function to vfio-pci the way docs/safety.md ("How writes are made") says, straight
# through sysfs.
raw_bind_vfio() {
    echo vfio-pci > "$SYS/$1/driver_override"
    [ -e "$SYS/$1/driver" ] && echo "$1" > "$SYS/$1/driver/unbind"
    echo "$1" > /sys/bus/pci/drivers_probe
}

# Waits up to $2 seconds (wall clock) for a shell condition $1. Counting tries instead let a
# condition that runs a program (~0.3 s each under TCG) wait four times as long as asked.
wait_for() {
    local end=$(( ${EPOCHREALTIME/./} + $2 * 1000000 ))
    while :; do
        eval "$1" && return 0
        [ "${EPOCHREALTIME/./}" -ge "$end" ] && return 1
        sleep 0.1
    done
}

CTL="$PT_BIN/passthroughctl"
STATE_DIR=/var/lib/passthroughd

# A real system bus in the guest (Debian's system.conf) with the project's bus policy installed,
# so policy and credentials work as on a host. $1: the policy file (default: the repository's).
start_system_bus() {
    mkdir -p /run/dbus /etc/dbus-1/system.d
    cp "${1:-$PT_REPO/systemd/org.passthroughd.Passthrough1.conf}" /etc/dbus-1/system.d/
    dbus-daemon --system --fork
}

# Starts passthroughd on the system bus (optionally under a wrapper such as strace or
# `unshare -pf --mount-proc`) and waits until it answers. Extra daemon flags go in the array
# DAEMON_FLAGS (e.g. DAEMON_FLAGS=(--write-timeout 2)). The pid (the wrapper's, with a wrapper)
# goes to a file, not a variable, so this also works inside `check` (which runs its command in a
# subshell).
DAEMON_PIDFILE="$PT_OUT/daemon.pid"
DAEMON_FLAGS=()
start_daemon() {
    if "$CTL" status >/dev/null 2>&1; then
        echo "start_daemon: a daemon is already serving" >&2
        return 1
    fi
    # The log reaches PT_OUT (9p, ~20 ms a write under TCG) through cat, so the daemon never
    # waits on the test bed's shared folder; a host's journald socket takes a line in microseconds.
    # cat is this shell's child, not the wrapper's: strace waits for all its children before it
    # exits, and would wait forever on a cat that reads from strace's own output.
    local log pid
    exec {log}> >(exec cat >>"$PT_OUT/daemon.log" 2>/dev/null)
    "$@" "$PT_BIN/passthroughd" --bus system --state-dir "$STATE_DIR" "${DAEMON_FLAGS[@]}" \
        >&"$log" 2>&1 {log}>&- &
    pid=$!
    exec {log}>&-
    echo "$pid" > "$DAEMON_PIDFILE"
    # Gives up as soon as the daemon (or its wrapper) exits, e.g. on a flag it does not know.
    wait_for '"$CTL" status >/dev/null 2>&1 || ! alive '"$pid" 30
    "$CTL" status >/dev/null 2>&1
}

# Whether process $1 is running. A daemon started inside `check` (a subshell) is reparented to
# the guest's init, which does not reap it: once it exits it stays a zombie, which `kill -0` still
# finds (that cost 20 s per restart).
alive() { local s; s="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" && [ -n "$s" ] && [ "$s" != Z ]; }

# The daemon's own pid: the started pid, or its passthroughd child when started under a wrapper.
daemon_main_pid() {
    local pid k
    pid="$(cat "$DAEMON_PIDFILE" 2>/dev/null)" || return 1
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != passthroughd ]; then
        for k in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
            [ "$(cat "/proc/$k/comm" 2>/dev/null)" = passthroughd ] && { echo "$k"; return 0; }
        done
    fi
    echo "$pid"
}

# Stops the daemon started last and waits until it is gone and its bus name is free. The daemon
# itself gets the SIGTERM: `unshare --fork` blocks SIGTERM while it waits for its child, so
# signalling only the wrapper left the daemon serving.
stop_daemon() {
    local pid main
    pid="$(cat "$DAEMON_PIDFILE" 2>/dev/null)" || return 0
    main="$(daemon_main_pid)"
    [ "$main" != "$pid" ] && kill "$main" 2>/dev/null
    kill "$pid" 2>/dev/null
    wait_for "! alive $pid" 20
    wait_for '! "$CTL" status >/dev/null 2>&1' 10
    rm -f "$DAEMON_PIDFILE"
}

daemon_pid() { cat "$DAEMON_PIDFILE" 2>/dev/null; }

# Waits up to $1 s for the daemon started last to be gone (killed by a fault). On a timeout it
# prints every thread of what is left, with its state and kernel wait channel, on one line
# (kept in $PT_OUT/still-there.txt).
daemon_gone() {
    local pid tree
    pid="$(daemon_pid)"
    wait_for "! alive $pid" "$1" && return 0
    tree="$(echo "$pid" $(cat /proc/"$pid"/task/*/children 2>/dev/null))"
    echo "still there:" $(ps -L -o pid=,tid=,stat=,wchan:28=,comm= -p "${tree// /,}" | tr -s ' \n' ' ;') |
        tee -a "$PT_OUT/still-there.txt"
    return 1
}

driver_of() { link_name "$SYS/$1/driver"; }

# Waits until udev has handled every event so far, so a timed benchmark round starts on an idle
# guest rather than while udev still sets up the interfaces the last reset brought back (under
# TCG that work takes a CPU for a second or more, and would land on whichever method runs next).
quiesce() { udevadm settle --timeout=30 2>/dev/null || true; }

# Benchmark arithmetic: the median of the numbers given, and a/b to two places.
median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# Puts a device back on its host driver by hand, as a reboot would (no daemon involved).
raw_release() {
    echo > "$SYS/$1/driver_override"
    [ -e "$SYS/$1/driver" ] && echo "$1" > "$SYS/$1/driver/unbind"
    echo "$1" > /sys/bus/pci/drivers_probe
}

# exit_is NAME CODE COMMAND...: the command exits with CODE; its stderr is kept for later checks.
exit_is() {
    local name="$1" code="$2" rc; shift 2
    "$@" >"$PT_OUT/last.out" 2>"$PT_OUT/last.err"; rc=$?
    # A wrong exit code leaves its reason next to it (last.err is overwritten by the next call).
    [ "$rc" = "$code" ] || note "$name: $(head -c 300 "$PT_OUT/last.err" | tr '\n' ' ')"
    expect_eq "$name" "$rc" "$code"
}
