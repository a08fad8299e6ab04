# The one entry point for humans and CI (.ci/run calls these targets).
CARGO ?= cargo

.PHONY: all fmt fmt-check clippy test check ci

all: fmt-check clippy test

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The test command the README gives: every unit, contract, property and integration test.
test:
	$(CARGO) nextest run --workspace --locked --no-fail-fast

check: fmt-check clippy

ci:
	bash .ci/run
