# One entry point for people and CI. `make demo` and `make test` install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
VM_SCENARIOS := tests/vm/scenarios/inventory.sh tests/vm/scenarios/host.sh tests/vm/scenarios/assign.sh tests/vm/scenarios/sriov.sh tests/vm/scenarios/config.sh tests/vm/scenarios/hotplug.sh tests/vm/scenarios/blocked.sh tests/vm/scenarios/vfio-probe.sh
# Benchmarks run the release binaries: timings of a debug build say nothing about the product.
VM_BENCHES := tests/vm/scenarios/bench-assign.sh tests/vm/scenarios/bench-sriov.sh tests/vm/scenarios/bench-apply.sh

.PHONY: demo test setup build lint unit vm vm-bench bench capture

## demo: boot a throwaway VM (real 6.12 kernel, emulated IOMMU and SR-IOV NIC) and show the inventory
demo: setup
	$(CARGO) build --release --bin passthroughd
	PT_BIN=$(CURDIR)/target/release tests/vm/run.sh tests/vm/scenarios/demo.sh

## test: everything CI runs: lint, unit and fixture tests, then the real-kernel VM scenarios
test: setup lint unit vm vm-bench

setup:
	tests/vm/setup.sh

build:
	$(CARGO) build --workspace --all-targets

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

vm: build
	@for s in $(VM_SCENARIOS); do \
	  echo "== VM scenario $$s"; \
	  PT_VM_QUIET=1 PT_VM_TIMEOUT=$${PT_VM_TIMEOUT:-600} tests/vm/run.sh $$s || exit 1; \
	done

vm-bench:
	$(CARGO) build --release --bins
	@for s in $(VM_BENCHES); do \
	  out=$(CURDIR)/.vm-out/$$(basename $$s .sh); rm -rf $$out; \
	  echo "== VM benchmark $$s"; \
	  PT_OUT=$$out PT_BIN=$(CURDIR)/target/release PT_VM_QUIET=1 PT_VM_TIMEOUT=$${PT_VM_TIMEOUT:-600} \
	    tests/vm/run.sh $$s || exit 1; \
	  cat $$out/bench-*.txt; \
	done

## bench: inventory scan of the synthetic 4,096-function host (prints medians and the lspci ratio)
bench:
	$(CARGO) bench -p passthroughd --bench inventory

## capture: re-capture the VM's sysfs tree into tests/fixtures/vm-6.12
capture: setup build
	tests/vm/capture.sh
