# The one entry point for humans and CI (.ci/run calls these targets).
CARGO ?= cargo

.PHONY: all run fmt fmt-check clippy clippy-fdb test nats-image python check ci bench mutants

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

# PyJWT and nats-py, the independent clients some tests use (they say they skipped where PyPI is
# unreachable).
python:
	@scripts/install-python.sh >/dev/null || echo "PyJWT or nats-py unavailable: the tests that use them will be skipped"

# The test command the README gives: unit, contract, property and integration tests.
# The crash tests run the service binaries as processes, so those are built first.
test: nats-image python
	$(CARGO) build --workspace --bins --locked
	$(CARGO) nextest run --workspace --locked --no-fail-fast

check: fmt-check clippy clippy-fdb

bench:
	$(CARGO) bench -p toka-kernel --bench apply

# Mutation testing of the security core with each crate's own tests: capabilities, the NATS
# permission model and the record chain (toka-contract), token checks and the live verifier
# (toka-runtime). Not in CI: it builds and tests every mutant (about half an hour here).
# A run goes on past missed mutants; they are listed in target/mutants/<crate>/mutants.out/missed.txt.
mutants:
	@$(CARGO) mutants --version >/dev/null 2>&1 || $(CARGO) install cargo-mutants --locked
	-$(CARGO) mutants -p toka-contract -o target/mutants/contract --timeout 300 \
		-f shared/contract/src/capability.rs -f shared/contract/src/access.rs -f shared/contract/src/record.rs
	-$(CARGO) mutants -p toka-runtime -o target/mutants/runtime --timeout 300 \
		-f shared/runtime/src/token.rs -f shared/runtime/src/verifier.rs

ci:
	bash .ci/run
