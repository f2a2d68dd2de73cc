#!/usr/bin/env bash
# `make install` / `make uninstall` / `make deb` checked without the VM (issue 14), from the
# repository root, after a release build (`make install-check` does both):
#   - the tree, file by file with modes, for PREFIX=/usr and PREFIX=/usr/local: PREFIX moves the
#     binaries, man pages, completions, docs, ExecStart= and Exec=, never the unit, bus policy,
#     activation file or polkit action; nothing is written outside DESTDIR;
#   - the contents: binaries and static files as built, ExecStart=/Exec= following PREFIX, the
#     names in the files matching the ones the code uses (proto/src/dbus.rs);
#   - an existing /etc/passthroughd/config.toml survives install, re-install and uninstall, and
#     uninstall removes everything else install put;
#   - systemd-analyze verify of the installed unit, and its security exposure under a ceiling;
#   - the polkit action and the introspection XML valid against their DTDs (xmllint --dtdvalid);
#     the bus policy well-formed with its rules checked by XPath: the busconfig.dtd Debian ships
#     (libdbus-1-dev) predates send_destination/send_interface and rejects every valid policy;
#   - the man pages render with groff without a warning, and name every command and option that
#     --help lists, with the same help text; passthroughd.toml(5) names every key of
#     config.example.toml;
#   - the completions parse, and bash's completes commands and options;
#   - the Debian package holds the same files as the install tree.
# Prints PASS/FAIL per check; exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1: $2"; }
expect_eq() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1" "got '$2', expected '$3'"; fi; }
# expect_same NAME ACTUAL EXPECTED (multi-line): a diff when they differ.
expect_same() {
    if [ "$2" = "$3" ]; then ok "$1"; else bad "$1" "differs:"; diff <(echo "$3") <(echo "$2") | sed 's/^/    /'; fi
}
check() { local name="$1"; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else bad "$name" "$* failed"; fi; }

W="$(mktemp -d "${TMPDIR:-/tmp}/pt-install.XXXXXX")"
trap 'rm -rf "$W"' EXIT
mk() { make --no-print-directory -s -C "$REPO" "$@" >"$W/make.log" 2>&1 || { cat "$W/make.log"; return 1; }; }
BUS=org.passthroughd.Passthrough1
for b in passthroughd passthroughctl; do
    [ -x "target/release/$b" ] || { echo "FAIL no target/release/$b: run make install-check"; exit 1; }
done

# What system services read from fixed places, on this machine: install with a DESTDIR must not
# touch any of it.
FIXED=(/usr/lib/systemd/system/passthroughd.service /lib/systemd/system/passthroughd.service
    /etc/systemd/system/passthroughd.service /usr/share/dbus-1/system.d/$BUS.conf
    /usr/share/dbus-1/system-services/$BUS.service /usr/share/polkit-1/actions/org.passthroughd.policy
    /usr/bin/passthroughd /usr/local/bin/passthroughd /etc/passthroughd
    /usr/lib/udev/rules.d/70-passthroughd.rules /etc/libvirt/hooks/qemu.d/passthroughd)
snapshot() { local f; for f in "${FIXED[@]}"; do stat -c '%n %s %Y' "$f" 2>/dev/null || echo "$f absent"; done; }
fixed_before="$(snapshot)"

# The files of a tree with their modes, and the expected list for a PREFIX (no leading slash).
tree() { (cd "$1" && find . \( -type f -o -type l \) -printf '%P %m\n' | sort); }
expected() {
    local p="$1"
    sort <<EOF
$p/bin/passthroughctl 755
$p/bin/passthroughd 755
$p/share/bash-completion/completions/passthroughctl 644
$p/share/doc/passthroughd/$BUS.Manager.xml 644
$p/share/doc/passthroughd/config.example.toml 644
$p/share/fish/vendor_completions.d/passthroughctl.fish 644
$p/share/man/man1/passthroughctl.1 644
$p/share/man/man5/passthroughd.toml.5 644
$p/share/man/man8/passthroughd.8 644
$p/share/zsh/vendor-completions/_passthroughctl 644
etc/libvirt/hooks/qemu.d/passthroughd 755
usr/lib/systemd/system/passthroughd.service 644
usr/lib/udev/rules.d/70-passthroughd.rules 644
usr/share/dbus-1/system-services/$BUS.service 644
usr/share/dbus-1/system.d/$BUS.conf 644
usr/share/polkit-1/actions/org.passthroughd.policy 644
EOF
}

# --- PREFIX=/usr ---------------------------------------------------------------------------
D="$W/usr"
check install-prefix-usr mk install DESTDIR="$D" PREFIX=/usr
[ -d "$D" ] || { cat "$W/make.log"; echo "install.sh: make install failed; nothing more to check"; exit 1; }
expect_same tree-prefix-usr "$(tree "$D")" "$(expected usr)"
expect_eq confdir-made-0755 "$(stat -c %a "$D/etc/passthroughd" 2>&1)" 755
expect_eq confdir-empty "$(ls -A "$D/etc/passthroughd" 2>&1)" ""
for b in passthroughd passthroughctl; do
    check "binary-$b-is-the-release-build" cmp "$D/usr/bin/$b" "target/release/$b"
done
check bus-policy-as-shipped cmp "$D/usr/share/dbus-1/system.d/$BUS.conf" "systemd/$BUS.conf"
check polkit-action-as-shipped cmp "$D/usr/share/polkit-1/actions/org.passthroughd.policy" systemd/org.passthroughd.policy
check doc-config-example cmp "$D/usr/share/doc/passthroughd/config.example.toml" config.example.toml
check doc-introspection-xml cmp "$D/usr/share/doc/passthroughd/$BUS.Manager.xml" "systemd/$BUS.Manager.xml"
check toml-man-page-as-written cmp "$D/usr/share/man/man5/passthroughd.toml.5" daemon/man/passthroughd.toml.5
check man1-is-generated cmp "$D/usr/share/man/man1/passthroughctl.1" <(target/release/passthroughctl --generate man)
check man8-is-generated cmp "$D/usr/share/man/man8/passthroughd.8" <(target/release/passthroughd --generate man)
UNIT="$D/usr/lib/systemd/system/passthroughd.service"
ACT="$D/usr/share/dbus-1/system-services/$BUS.service"
expect_eq unit-execstart "$(sed -n 's/^ExecStart=//p' "$UNIT")" "/usr/bin/passthroughd --bus system"
expect_eq activation-exec "$(sed -n 's/^Exec=//p' "$ACT")" "/usr/bin/passthroughd --bus system"
# The names in the files are the ones the code serves and checks.
service_const="$(sed -n 's/^pub const SERVICE: &str = "\(.*\)";/\1/p' proto/src/dbus.rs)"
action_const="$(sed -n 's/^pub const ACTION_MANAGE_DEVICES: &str = "\(.*\)";/\1/p' proto/src/dbus.rs)"
expect_eq activation-name-is-served-name "$(sed -n 's/^Name=//p' "$ACT")" "$service_const"
expect_eq unit-busname-is-served-name "$(sed -n 's/^BusName=//p' "$UNIT")" "$service_const"
expect_eq activation-systemd-service-is-unit-alias "$(sed -n 's/^SystemdService=//p' "$ACT")" \
    "$(sed -n 's/^Alias=//p' "$UNIT")"
expect_eq unit-differs-from-template-only-in-execstart \
    "$(diff systemd/passthroughd.service "$UNIT" | grep -c '^[<>]')" 0

# systemd-analyze verify checks that ExecStart's program exists: point it into DESTDIR.
if command -v systemd-analyze >/dev/null; then
    mkdir -p "$W/verify"
    sed "s|^ExecStart=/|ExecStart=$D/|" "$UNIT" >"$W/verify/passthroughd.service"
    # Clean means exit 0 and not a word: verify only warns (exit 0) about a bad value.
    verify() { local out rc; out="$(systemd-analyze verify "$1" 2>&1)"; rc=$?; echo "$rc:$out"; }
    expect_eq "systemd-analyze-verify" "$(verify "$W/verify/passthroughd.service")" "0:"
    # The same unit with a typo is not clean: the check above can fail.
    sed 's/^ProtectSystem=strict/ProtectSystem=strikt/' "$W/verify/passthroughd.service" >"$W/verify/broken.service"
    check systemd-analyze-verify-catches-a-typo grep -q "strikt" <<<"$(verify "$W/verify/broken.service")"
    security="$(systemd-analyze security --offline=true "$W/verify/passthroughd.service" 2>&1)"
    exposure="$(sed -n 's/.*Overall exposure level for passthroughd.service: \([0-9.]*\).*/\1/p' <<<"$security")"
    echo "     systemd-analyze security: ${exposure:-?} (the unit's comment says where it stands)"
    check "security-exposure-at-most-3.4" awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 3.4) }'
else
    bad systemd-analyze "not installed (tests/vm/setup.sh installs the systemd package)"
fi

# XML: the polkit action and the introspection data against their DTDs; the bus policy by rules.
POLICY="$D/usr/share/dbus-1/system.d/$BUS.conf"
ACTION="$D/usr/share/polkit-1/actions/org.passthroughd.policy"
xml_ok() { local out; out="$(xmllint --nonet --noout "$@" 2>&1)" && [ -z "$out" ] || { echo "$out"; return 1; }; }
check polkit-action-valid xml_ok --dtdvalid /usr/share/polkit-1/policyconfig-1.dtd "$ACTION"
check introspection-xml-valid xml_ok --dtdvalid /usr/share/xml/dbus-1/introspect.dtd \
    "$D/usr/share/doc/passthroughd/$BUS.Manager.xml"
check bus-policy-well-formed xml_ok "$POLICY"
xp() { xmllint --nonet --xpath "$1" "$2" 2>/dev/null; }
expect_eq polkit-action-id "$(xp 'string(/policyconfig/action/@id)' "$ACTION")" "$action_const"
expect_eq polkit-one-action "$(xp 'count(/policyconfig/action)' "$ACTION")" 1
expect_eq polkit-admin-only "$(xp 'string(/policyconfig/action/defaults/allow_any)' "$ACTION")" auth_admin
expect_eq policy-root-owns "$(xp "count(/busconfig/policy[@user='root']/allow[@own='$service_const'])" "$POLICY")" 1
expect_eq policy-others-may-not-own "$(xp "count(/busconfig/policy[@context='default']/deny[@own='$service_const'])" "$POLICY")" 1
expect_eq policy-no-other-owner "$(xp "count(//allow[@own and not(../@user='root')])" "$POLICY")" 0
expect_eq policy-anyone-calls-the-manager \
    "$(xp "count(/busconfig/policy[@context='default']/allow[@send_destination='$service_const' and @send_interface='org.passthroughd.Passthrough1.Manager'])" "$POLICY")" 1
expect_eq policy-every-allow-names-the-service \
    "$(xp "count(//allow[not(@own) and not(@send_destination='$service_const')])" "$POLICY")" 0

# Man pages: groff without warnings; then the rendered text (one line, no hyphenation, ASCII
# punctuation) against what --help says.
MAN1="$D/usr/share/man/man1/passthroughctl.1"
MAN8="$D/usr/share/man/man8/passthroughd.8"
MAN5="$D/usr/share/man/man5/passthroughd.toml.5"
for page in "$MAN1" "$MAN8" "$MAN5"; do
    out="$(groff -man -Tutf8 -ww -z "$page" 2>&1)"; rc=$?
    expect_eq "man-renders-$(basename "$page")" "$rc:$out" "0:"
done
flat() { tr -s ' \n\t' '   ' | sed 's/ *$//'; }
render() {
    groff -man -Tutf8 -rHY=0 -rLL=500n -P-cbou "$1" 2>/dev/null |
        sed -e 's/\xe2\x80\x90/-/g' -e 's/\xe2\x80\x99/'"'"'/g' -e 's/\xe2\x80\x98/`/g' -e 's/\xe2\x88\x92/-/g' | flat
}
# The commands --help lists (section "Commands:"), and the options of one command.
help_commands() { "$@" --help | sed -n '/^Commands:/,/^$/p' | sed -n 's/^  \([a-z-]*\) .*/\1/p'; }
help_options() { "$@" --help | grep -o -- '--[a-z][a-z-]*' | sort -u; }
# The first sentence of each command's about, as --help prints it.
help_abouts() { "$@" --help | sed -n '/^Commands:/,/^$/p' | sed -n 's/^  [a-z-]*  *\(.*\)/\1/p'; }
man_names() {  # man_names PAGE BINARY [SUBCOMMAND...]
    local page="$1" text cmd sub; shift
    text="$(render "$page")"
    for opt in $(help_options "$@"); do
        grep -qF -- "$opt" <<<"$text" || bad "man-$(basename "$page")-names-$*-$opt" "not in the page"
    done
    while IFS= read -r about; do
        [ -z "$about" ] || grep -qF -- "$(flat <<<"$about")" <<<"$text" ||
            bad "man-$(basename "$page")-help-text" "'$about' (from $* --help) not in the page"
    done < <(help_abouts "$@")
    for sub in $(help_commands "$@"); do
        cmd="$* $sub"
        grep -qF -- "${cmd#target/release/}" <<<"$text" || bad "man-$(basename "$page")-names-${cmd#target/release/}" "not in the page"
        [ "$sub" = help ] || man_names "$page" "$@" "$sub"
    done
}
before=$fail
man_names "$MAN1" target/release/passthroughctl
man_names "$MAN8" target/release/passthroughd
[ "$fail" = "$before" ] && ok "man-pages-name-every-command-and-option-with-its-help"
expect_eq man-lists-the-vf-commands "$(help_commands target/release/passthroughctl vf | tr '\n' ' ')" "create destroy list help "
man1="$(render "$MAN1")"
for code in 0 1 2 3 4 5 69; do
    grep -qE "EXIT STATUS.* $code [A-Z]" <<<"$man1" || bad "man1-exit-status-$code" "not in EXIT STATUS"
done
ok man1-lists-exit-statuses
no_generate() { ! grep -q -- --generate <<<"$(render "$MAN1") $(render "$MAN8")"; }
check man-has-no-generate-flag no_generate
check help-has-no-generate-flag sh -c '! target/release/passthroughctl --help | grep -q generate'
# Every key and table of config.example.toml is in passthroughd.toml(5).
man5="$(render "$MAN5")"
keys="$(sed -n 's/^\([a-z_]*\) *=.*/\1/p; s/^\(\[\[*[a-z]*\]\]*\).*/\1/p' config.example.toml; grep -o '[a-z_]* = "0x' config.example.toml | cut -d' ' -f1)"
before=$fail
for k in $(sort -u <<<"$keys"); do
    grep -qF -- "$k" <<<"$man5" || bad "man5-names-$k" "not in passthroughd.toml(5)"
done
[ "$fail" = "$before" ] && ok "man5-names-every-key-of-config.example.toml ($(sort -u <<<"$keys" | wc -l) keys and tables)"

# Completions.
BASHC="$D/usr/share/bash-completion/completions/passthroughctl"
check bash-completion-parses bash -n "$BASHC"
complete_words() {  # the completions bash offers after the given words (the last may be partial)
    bash -c 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        _passthroughctl passthroughctl "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"; printf "%s\n" "${COMPREPLY[@]}"' _ "$BASHC" "$@" | sort | tr '\n' ' '
}
check bash-completes-commands grep -q "assign .*groups .*list .*vf" <<<"$(complete_words passthroughctl '')"
check bash-completes-vf-commands grep -q "create destroy .*list" <<<"$(complete_words passthroughctl vf '')"
check bash-completes-assign-options grep -q -- "--force .*--group .*--runtime" <<<"$(complete_words passthroughctl assign --)"
if command -v zsh >/dev/null; then check zsh-completion-parses zsh -n "$D/usr/share/zsh/vendor-completions/_passthroughctl"
else check zsh-completion-is-for-passthroughctl grep -q '^#compdef passthroughctl' "$D/usr/share/zsh/vendor-completions/_passthroughctl"; fi
if command -v fish >/dev/null; then check fish-completion-parses fish -n "$D/usr/share/fish/vendor_completions.d/passthroughctl.fish"
else check fish-completion-is-for-passthroughctl grep -q '^complete -c passthroughctl' "$D/usr/share/fish/vendor_completions.d/passthroughctl.fish"; fi

# --- PREFIX=/usr/local ----------------------------------------------------------------------
L="$W/local"
check install-prefix-usr-local mk install DESTDIR="$L" PREFIX=/usr/local
expect_same tree-prefix-usr-local "$(tree "$L")" "$(expected usr/local)"
expect_eq usr-local-unit-execstart "$(sed -n 's/^ExecStart=//p' "$L/usr/lib/systemd/system/passthroughd.service")" \
    "/usr/local/bin/passthroughd --bus system"
expect_eq usr-local-activation-exec "$(sed -n 's/^Exec=//p' "$L/usr/share/dbus-1/system-services/$BUS.service")" \
    "/usr/local/bin/passthroughd --bus system"
check usr-local-udev-rule-runs-prefix grep -q 'RUN+="/usr/local/bin/passthroughd claim $kernel"' \
    "$L/usr/lib/udev/rules.d/70-passthroughd.rules"
check usr-local-libvirt-hook-runs-prefix grep -qx 'exec /usr/local/bin/passthroughctl libvirt-hook "$@"' \
    "$L/etc/libvirt/hooks/qemu.d/passthroughd"
check usr-local-uninstall mk uninstall DESTDIR="$L" PREFIX=/usr/local
expect_eq usr-local-uninstall-removes-every-file "$(tree "$L")" ""
check usr-local-uninstall-removes-empty-confdir test ! -e "$L/etc/passthroughd"

# --- An existing config, re-install, uninstall ------------------------------------------------
U="$W/upgrade"
mkdir -p "$U/etc/passthroughd" "$U/usr/share/doc/other"
printf '# the administrator'"'"'s\nversion = 1\n' >"$U/etc/passthroughd/config.toml"
chmod 0700 "$U/etc/passthroughd"
cp "$U/etc/passthroughd/config.toml" "$W/config.orig"
echo keep >"$U/usr/share/doc/other/file"
check install-over-a-config mk install DESTDIR="$U" PREFIX=/usr
check reinstall mk install DESTDIR="$U" PREFIX=/usr
check config-kept-by-install cmp "$U/etc/passthroughd/config.toml" "$W/config.orig"
expect_eq confdir-mode-kept "$(stat -c %a "$U/etc/passthroughd")" 700
expect_same tree-with-config "$(tree "$U")" "$(printf '%s\n' "$(expected usr)" 'etc/passthroughd/config.toml 644' \
    'usr/share/doc/other/file 644' | sort)"
check uninstall mk uninstall DESTDIR="$U" PREFIX=/usr
expect_same uninstall-leaves-only-what-was-there "$(tree "$U")" "$(printf '%s\n' 'etc/passthroughd/config.toml 644' \
    'usr/share/doc/other/file 644')"
check config-kept-by-uninstall cmp "$U/etc/passthroughd/config.toml" "$W/config.orig"

# --- The Debian package ---------------------------------------------------------------------
if command -v dpkg-deb >/dev/null; then
    check make-deb mk deb
    deb="$(ls -t target/passthroughd_*.deb 2>/dev/null | head -n1)"
    if [ -n "$deb" ]; then
        expect_same deb-holds-the-install-tree "$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { sub(/^\.\//, "", $6); print $6 }' | sort)" \
            "$(expected usr | cut -d' ' -f1)"
        expect_eq deb-files-owned-by-root "$(dpkg-deb -c "$deb" | awk '{ print $2 }' | sort -u)" root/root
        expect_eq deb-package "$(dpkg-deb -f "$deb" Package)" passthroughd
        check deb-has-etc-passthroughd grep -q ' \./etc/passthroughd/$' <<<"$(dpkg-deb -c "$deb")"
    fi
fi

expect_same destdir-honoured "$(snapshot)" "$fixed_before"
echo "install.sh: pass=$pass fail=$fail"
[ "$fail" = 0 ]
