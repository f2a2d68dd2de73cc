# Helpers for VM scenarios. Source it first thing in a scenario:
#   . "$PT_REPO/tests/vm/lib.sh"
#   check NAME COMMAND...            PASS if COMMAND exits 0
#   expect_eq NAME ACTUAL EXPECTED   PASS if the strings are equal
#   note TEXT                        a line in the results, not a check
#   finish                           writes "DONE pass=N fail=M" and exits (0 only if no FAIL)
# Results go to $PT_OUT/results.txt; run.sh on the host reads them.
: "${PT_OUT:?PT_OUT not set (run scenarios through tests/vm/run.sh)}"
PT_RESULTS="${PT_RESULTS:-$PT_OUT/results.txt}"
_pt_pass=0
_pt_fail=0
_pt_start="${EPOCHREALTIME/./}"
: >"$PT_RESULTS"

_pt_record() { echo "$1" | tee -a "$PT_RESULTS"; }

check() {
    local name="$1"; shift
    local out rc
    out="$("$@" 2>&1)"; rc=$?
    if [ "$rc" = 0 ]; then
        _pt_pass=$((_pt_pass + 1)); _pt_record "PASS $name"
    else
        _pt_fail=$((_pt_fail + 1))
        _pt_record "FAIL $name (exit $rc: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ' | cut -c1-300))"
    fi
    return 0
}

expect_eq() {
    local name="$1" actual="$2" expected="$3"
    if [ "$actual" = "$expected" ]; then
        _pt_pass=$((_pt_pass + 1)); _pt_record "PASS $name"
    else
        _pt_fail=$((_pt_fail + 1))
        _pt_record "FAIL $name (got '$actual', expected '$expected')"
    fi
    return 0
}

note() { _pt_record "NOTE $*"; }

finish() {
    # The scenario's own time in the guest, apart from boot (run.sh prints boot+run).
    note "scenario ran $(( (${EPOCHREALTIME/./} - _pt_start) / 1000000 )) s in the guest"
    _pt_record "DONE pass=$_pt_pass fail=$_pt_fail"
    sync
    [ "$_pt_fail" = 0 ] && exit 0 || exit 1
}
