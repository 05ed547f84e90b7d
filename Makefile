# canary: every target installs what it needs first (cargo xtask bootstrap is
# idempotent and takes well under a second when the machine is ready).
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: bootstrap ebpf build test seed-targets-quick lint deploy-canary test-traffic-split simulate-failures verify-rollback bench clean

bootstrap:
	$(CARGO) xtask bootstrap

ebpf: bootstrap
	$(CARGO) xtask build-ebpf

build: ebpf
	$(CARGO) build --release --workspace --bins

# All tests: unit, packet fixtures (BPF_PROG_TEST_RUN) and network-namespace tests.
# Needs root. The netns tests run one at a time: each builds its own topology and
# they share the machine's two cores.
test: ebpf
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=1
	$(MAKE) --no-print-directory seed-targets-quick

# The seed's four lab targets in their short form (debug build, faster clock, less
# traffic, the same checks), so none of them can silently stop doing its job.
seed-targets-quick:
	$(CARGO) xtask lab deploy --quick
	$(CARGO) xtask lab traffic-split --quick
	$(CARGO) xtask lab simulate-failures --quick
	$(CARGO) xtask lab verify-rollback --quick

lint: ebpf
	$(CARGO) fmt --all -- --check
	cd canary-ebpf && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The main job: a lab of namespaces, backends, the agent splitting live traffic.
deploy-canary: build
	$(CARGO) xtask lab deploy

test-traffic-split: build
	$(CARGO) xtask lab traffic-split

simulate-failures: build
	$(CARGO) xtask lab simulate-failures

verify-rollback: build
	$(CARGO) xtask lab verify-rollback

bench: build
	$(CARGO) xtask bench

clean:
	$(CARGO) clean
	rm -rf canary-ebpf/target
