# The one entry point for humans and CI (.ci/run calls these targets).
CARGO ?= cargo

.PHONY: all run fmt fmt-check clippy clippy-fdb test nats-image pyjwt check ci bench

all: fmt-check clippy test

# Run the secured local stack (NATS + the four services) on loopback; Ctrl-C stops it.
run:
	scripts/local-stack.sh

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The FoundationDB backend is checked (not linked: no libfdb_c here); needs libclang-dev.
clippy-fdb:
	$(CARGO) clippy -p toka-storage --features fdb --all-targets --locked -- -D warnings

# The NATS image the container tests use; skipped (and the tests say so) without Docker.
nats-image:
	@if docker info >/dev/null 2>&1; then scripts/build-nats-image.sh; else echo "docker unavailable: container tests will be skipped"; fi

# PyJWT for the interop test (skipped, saying so, where PyPI is unreachable).
pyjwt:
	@scripts/install-pyjwt.sh >/dev/null || echo "PyJWT unavailable: the interop test will be skipped"

# The test command the README gives: unit, contract, property and integration tests.
# The crash tests run the service binaries as processes, so those are built first.
test: nats-image pyjwt
	$(CARGO) build --workspace --bins --locked
	$(CARGO) nextest run --workspace --locked --no-fail-fast

check: fmt-check clippy clippy-fdb

bench:
	$(CARGO) bench -p toka-kernel --bench apply

ci:
	bash .ci/run
