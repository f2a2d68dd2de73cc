# One entry point for people and CI. `make demo` and `make test` install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
# Incremental compilation keeps a second copy of every crate's intermediate state: no help to a
# build from a fresh clone (CI), only disk. Set CARGO_INCREMENTAL=1 to keep it while iterating.
CARGO_INCREMENTAL ?= 0
export CARGO_INCREMENTAL
VM_SCENARIOS := tests/vm/scenarios/inventory.sh tests/vm/scenarios/host.sh tests/vm/scenarios/assign.sh tests/vm/scenarios/sriov.sh tests/vm/scenarios/config.sh tests/vm/scenarios/hotplug.sh tests/vm/scenarios/blocked.sh tests/vm/scenarios/leases.sh tests/vm/scenarios/verify.sh tests/vm/scenarios/dra.sh tests/vm/scenarios/installed.sh
# Benchmarks run the release binaries: timings of a debug build say nothing about the product.
VM_BENCHES := tests/vm/scenarios/bench-assign.sh tests/vm/scenarios/bench-sriov.sh tests/vm/scenarios/bench-apply.sh

.PHONY: demo demo-short test test-long setup build release lint unit load fuzz fuzz-short vm vm-bench bench \
	capture install uninstall install-check deb

## demo: boot a throwaway VM (real 6.12 kernel, emulated IOMMU and SR-IOV NIC), run the daemon on
## a system bus inside it and walk through the CLI as a recorded terminal session
demo: setup release
	PT_BIN=$(CURDIR)/target/release PT_OUT=$(CURDIR)/.vm-out/demo tests/vm/run.sh tests/vm/scenarios/demo.sh

## test: everything CI runs: lint, unit and fixture tests, 20 s of fuzzing per parser, the D-Bus
## load, the install tree, then the real-kernel VM scenarios, benchmarks and the demo's short form
test: setup lint unit fuzz-short load install-check vm vm-bench demo-short

## test-long: the long forms, after everything `make test` runs: the D-Bus load for 60 s,
## 10 minutes of fuzzing per parser, and the benchmarks with every tool at every size
test-long: test
	$(MAKE) --no-print-directory load PT_LOAD_SECS=60
	$(MAKE) --no-print-directory fuzz PT_FUZZ_SECS=600
	PT_BENCH_FULL=1 $(MAKE) --no-print-directory vm-bench

# The demo in CI, so it cannot rot: fewer steps, every step still checked.
demo-short: release
	PT_BIN=$(CURDIR)/target/release PT_OUT=$(CURDIR)/.vm-out/demo-short PT_VM_QUIET=1 \
	  PT_VM_TIMEOUT=$${PT_VM_TIMEOUT:-600} tests/vm/run.sh tests/vm/scenarios/demo.sh --short
	grep -q '^NOTE short form' .vm-out/demo-short/results.txt

setup:
	tests/vm/setup.sh

build:
	$(CARGO) build --workspace --all-targets

# The daemon and the CLI only: the benchmarks and the demo run them, and the DRA plugin's
# dependencies (gRPC, the Kubernetes client) would add minutes of release build for nothing.
release:
	$(CARGO) build --release --bins -p passthroughd -p passthroughctl

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

# 64 D-Bus clients with mixed requests against the real engine over the simulated kernel, one
# device blocked in the kernel (cli/tests/integration/load.rs): prints throughput and latencies.
PT_LOAD_SECS ?= 5
load:
	PT_LOAD_SECS=$(PT_LOAD_SECS) $(CARGO) test -p passthroughctl --test integration load:: -- \
	  --ignored --nocapture

## fuzz: AFL++ on every parser of outside input, PT_FUZZ_SECS (20) per target; a crash is kept
## under tests/fuzz/TARGET/ (tests/fuzz/run.sh)
PT_FUZZ_SECS ?= 20
fuzz:
	tests/fuzz/run.sh $(PT_FUZZ_SECS)

# In `make test`: the instrumented build (about 800 MB) goes once the run is over.
fuzz-short:
	PT_FUZZ_CLEAN=1 tests/fuzz/run.sh $(PT_FUZZ_SECS)

# installed.sh runs the daemon from an install tree (DESTDIR=PT_OUT/root) made here beforehand:
# the guest sees the repository read-only and cannot build.
vm: build
	@for s in $(VM_SCENARIOS); do \
	  out=; \
	  if [ $$s = tests/vm/scenarios/installed.sh ]; then \
	    out=$(CURDIR)/.vm-out/installed; rm -rf $$out; \
	    $(MAKE) --no-print-directory -s install DESTDIR=$$out/root PREFIX=/usr || exit 1; \
	  fi; \
	  echo "== VM scenario $$s"; \
	  PT_OUT=$$out PT_VM_QUIET=1 PT_VM_TIMEOUT=$${PT_VM_TIMEOUT:-600} tests/vm/run.sh $$s || exit 1; \
	done

# A benchmark whose guest died without a result (run.sh exits 3; its kernel console is printed
# above) runs once more: it measures, and a crash of the emulated guest gives no numbers. Failed
# checks (exit 1) are never retried.
vm-bench: release
	@for s in $(VM_BENCHES); do \
	  out=$(CURDIR)/.vm-out/$$(basename $$s .sh); \
	  for try in 1 2; do \
	    rm -rf $$out; echo "== VM benchmark $$s"; rc=0; \
	    PT_OUT=$$out PT_BIN=$(CURDIR)/target/release PT_VM_QUIET=1 \
	      PT_VM_TIMEOUT=$${PT_VM_TIMEOUT:-600} tests/vm/run.sh $$s || rc=$$?; \
	    [ $$rc = 3 ] && [ $$try = 1 ] && { echo "== the guest died; running $$s again"; continue; }; \
	    [ $$rc = 0 ] || exit 1; \
	    break; \
	  done; \
	  cat $$out/bench-*.txt; \
	done

## bench: inventory scan of the synthetic 4,096-function host (prints medians and the lspci ratio)
bench:
	$(CARGO) bench -p passthroughd --bench inventory

## capture: re-capture the VM's sysfs tree into tests/fixtures/vm-6.12
capture: setup build
	tests/vm/capture.sh

# --- Installation --------------------------------------------------------------------------
# `make install [DESTDIR=...] [PREFIX=/usr]`: the release binaries to PREFIX/bin, with their man
# pages, completions and documentation under PREFIX/share. What system services read from fixed
# places goes to those places (under DESTDIR) whatever PREFIX is:
#  - the unit to /usr/lib/systemd/system: systemd's directory for units shipped by packages on
#    every distribution (on Debian /lib/systemd/system is the same directory through the merged
#    /usr, and systemd reads both). /etc/systemd/system is the administrator's (overrides,
#    `systemctl edit`, the links `systemctl enable` makes) and PREFIX/lib/systemd/system is read
#    only for PREFIX=/usr/local, so neither would work for every PREFIX;
#  - the bus policy and activation file to /usr/share/dbus-1 (the system bus reads only there
#    and in /etc/dbus-1), the polkit action to /usr/share/polkit-1/actions (polkitd's only
#    directory for actions);
#  - the udev rule (early claim at device add) to /usr/lib/udev/rules.d, udevd's directory for
#    packaged rules; the libvirt hook to /etc/libvirt/hooks/qemu.d/passthroughd, the only place
#    libvirtd looks for hooks (it takes effect at libvirtd's next start);
#  - /etc/passthroughd, the config directory, empty: a config.toml there is the administrator's
#    and never written (config.example.toml goes to the documentation).
# ExecStart= of the unit, Exec= of the activation file, the rule's RUN and the hook's exec point
# at PREFIX/bin.
# `make uninstall` with the same DESTDIR and PREFIX removes exactly those files, and
# /etc/passthroughd only when empty; the state dir (/var/lib/passthroughd, made by systemd's
# StateDirectory=) is never touched.
PREFIX ?= /usr
DESTDIR ?=
BINDIR := $(PREFIX)/bin
MANDIR := $(PREFIX)/share/man
DOCDIR := $(PREFIX)/share/doc/passthroughd
BASHCOMPDIR := $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR := $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR := $(PREFIX)/share/fish/vendor_completions.d
UNITDIR := /usr/lib/systemd/system
DBUSDIR := /usr/share/dbus-1
POLKITDIR := /usr/share/polkit-1/actions
UDEVDIR := /usr/lib/udev/rules.d
HOOKDIR := /etc/libvirt/hooks/qemu.d
CONFDIR := /etc/passthroughd
BUS_NAME := org.passthroughd.Passthrough1
GEN := target/dist

# Every file install puts, in DESTDIR-relative paths; uninstall removes exactly these.
INSTALLED_FILES := $(BINDIR)/passthroughd $(BINDIR)/passthroughctl \
	$(UNITDIR)/passthroughd.service \
	$(DBUSDIR)/system.d/$(BUS_NAME).conf $(DBUSDIR)/system-services/$(BUS_NAME).service \
	$(POLKITDIR)/org.passthroughd.policy \
	$(UDEVDIR)/70-passthroughd.rules $(HOOKDIR)/passthroughd \
	$(MANDIR)/man1/passthroughctl.1 $(MANDIR)/man8/passthroughd.8 $(MANDIR)/man5/passthroughd.toml.5 \
	$(BASHCOMPDIR)/passthroughctl $(ZSHCOMPDIR)/_passthroughctl $(FISHCOMPDIR)/passthroughctl.fish \
	$(DOCDIR)/config.example.toml $(DOCDIR)/$(BUS_NAME).Manager.xml

## install: the release build, man pages, completions, unit, bus policy, polkit action (DESTDIR, PREFIX)
install: release
	@rm -rf $(GEN) && mkdir -p $(GEN)
	target/release/passthroughctl --generate man > $(GEN)/passthroughctl.1
	target/release/passthroughd --generate man > $(GEN)/passthroughd.8
	for sh in bash zsh fish; do target/release/passthroughctl --generate $$sh > $(GEN)/passthroughctl.$$sh; done
	sed 's|^ExecStart=/usr/bin/|ExecStart=$(BINDIR)/|' systemd/passthroughd.service > $(GEN)/passthroughd.service
	sed 's|^Exec=/usr/bin/|Exec=$(BINDIR)/|' systemd/$(BUS_NAME).service > $(GEN)/$(BUS_NAME).service
	grep -qx 'ExecStart=$(BINDIR)/passthroughd --bus system' $(GEN)/passthroughd.service
	grep -qx 'Exec=$(BINDIR)/passthroughd --bus system' $(GEN)/$(BUS_NAME).service
	sed 's|/usr/bin/passthroughd |$(BINDIR)/passthroughd |' systemd/70-passthroughd.rules > $(GEN)/70-passthroughd.rules
	sed 's|^exec /usr/bin/passthroughctl |exec $(BINDIR)/passthroughctl |' systemd/libvirt-qemu-hook > $(GEN)/libvirt-qemu-hook
	grep -q 'RUN+="$(BINDIR)/passthroughd claim' $(GEN)/70-passthroughd.rules
	grep -qx 'exec $(BINDIR)/passthroughctl libvirt-hook "$$@"' $(GEN)/libvirt-qemu-hook
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DBUSDIR)/system.d \
	  $(DESTDIR)$(DBUSDIR)/system-services $(DESTDIR)$(POLKITDIR) $(DESTDIR)$(MANDIR)/man1 \
	  $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(BASHCOMPDIR) \
	  $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR) $(DESTDIR)$(DOCDIR) \
	  $(DESTDIR)$(UDEVDIR) $(DESTDIR)$(HOOKDIR)
	[ -d $(DESTDIR)$(CONFDIR) ] || install -d -m 0755 $(DESTDIR)$(CONFDIR)
	install -m 0755 target/release/passthroughd target/release/passthroughctl $(DESTDIR)$(BINDIR)/
	install -m 0644 $(GEN)/passthroughd.service $(DESTDIR)$(UNITDIR)/
	install -m 0644 systemd/$(BUS_NAME).conf $(DESTDIR)$(DBUSDIR)/system.d/
	install -m 0644 $(GEN)/$(BUS_NAME).service $(DESTDIR)$(DBUSDIR)/system-services/
	install -m 0644 systemd/org.passthroughd.policy $(DESTDIR)$(POLKITDIR)/
	install -m 0644 $(GEN)/70-passthroughd.rules $(DESTDIR)$(UDEVDIR)/
	install -m 0755 $(GEN)/libvirt-qemu-hook $(DESTDIR)$(HOOKDIR)/passthroughd
	install -m 0644 $(GEN)/passthroughctl.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 daemon/man/passthroughd.toml.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 $(GEN)/passthroughd.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 $(GEN)/passthroughctl.bash $(DESTDIR)$(BASHCOMPDIR)/passthroughctl
	install -m 0644 $(GEN)/passthroughctl.zsh $(DESTDIR)$(ZSHCOMPDIR)/_passthroughctl
	install -m 0644 $(GEN)/passthroughctl.fish $(DESTDIR)$(FISHCOMPDIR)/passthroughctl.fish
	install -m 0644 config.example.toml systemd/$(BUS_NAME).Manager.xml $(DESTDIR)$(DOCDIR)/

## uninstall: remove what install put (same DESTDIR and PREFIX); keeps /etc/passthroughd/config.toml
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED_FILES))
	rmdir --ignore-fail-on-non-empty $(DESTDIR)$(DOCDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(HOOKDIR) 2>/dev/null || true

## install-check: install into temporary trees and check them file by file (tests/install.sh)
install-check: release
	tests/install.sh

## deb: a Debian package of the same install tree (PREFIX=/usr), with plain dpkg-deb
# (packaging/debian/: the control file and maintainer scripts; no debhelper).
DEB_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB := target/passthroughd_$(DEB_VERSION)_$(DEB_ARCH).deb
deb: release
	rm -rf target/deb && $(MAKE) --no-print-directory -s install DESTDIR=$(CURDIR)/target/deb PREFIX=/usr
	# Debian ships binaries without debug info (the release profile keeps line tables: 100 MB).
	strip --strip-debug target/deb$(BINDIR)/passthroughd target/deb$(BINDIR)/passthroughctl
	mkdir -p target/deb/DEBIAN
	sed -e 's/@VERSION@/$(DEB_VERSION)/' -e 's/@ARCH@/$(DEB_ARCH)/' \
	  -e "s/@SIZE@/$$(du -sk --exclude=DEBIAN target/deb | cut -f1)/" packaging/debian/control > target/deb/DEBIAN/control
	install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm target/deb/DEBIAN/
	dpkg-deb --root-owner-group -Zgzip --build target/deb $(DEB)
