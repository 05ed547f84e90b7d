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

# All tests, as root: unit, simulations, packet fixtures (BPF_PROG_TEST_RUN), map
# upgrades and the network-namespace suites, one test at a time (each builds its
# own topology and they share the machine's two cores), then the seed's lab targets
# in their short form. The suites that need root are behind features
# (canary-agent/kernel-tests, canary-lab/netns), so a plain `cargo test` as any user
# runs the rest; one feature set for every step, so nothing is built twice.
TEST_FEATURES := canary-agent/kernel-tests,canary-lab/netns
test: ebpf
	$(CARGO) build --workspace --bins --features $(TEST_FEATURES)
	@status=0; \
	$(CARGO) test --workspace --features $(TEST_FEATURES) --no-fail-fast -- --test-threads=1 || status=1; \
	$(MAKE) --no-print-directory seed-targets-quick || status=1; \
	exit $$status

# The seed's four lab targets in their short form (debug build, faster clock, less
# traffic, the same checks), so none of them can silently stop doing its job.
seed-targets-quick:
	$(CARGO) xtask lab deploy --quick
	$(CARGO) xtask lab traffic-split --quick
	$(CARGO) xtask lab simulate-failures --quick
	$(CARGO) xtask lab verify-rollback --quick

lint: ebpf
	$(CARGO) xtask deps
	$(CARGO) fmt --all -- --check
	cd canary-ebpf && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets --features $(TEST_FEATURES) -- -D warnings

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
