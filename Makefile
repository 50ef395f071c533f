SHELL := /bin/bash
# braidinfer: `make test` sets up and runs the test suite; `make bundle` prepares dist/ for
# the GPU machine (which has no cargo): binaries, the GPU test executable, tokenizer files and
# gpu-test.sh.

SHARED_MODEL ?= ../shared/models/qwen3-0.6b
CARGO ?= cargo

.PHONY: setup test build bundle fmt lint ptxas clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --release --bins

test: setup
	@mkdir -p target
	set -o pipefail; $(CARGO) test --release -- --show-output 2>&1 | tee target/test-output.log
	@bash scripts/test-summary.sh target/test-output.log

bundle: setup
	@bash scripts/bundle.sh "$(SHARED_MODEL)"

fmt:
	$(CARGO) fmt --all

lint: setup
	$(CARGO) clippy --release --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

# The compiler's resource report (registers, shared memory, spills) of every kernel.
ptxas: setup
	@bash scripts/ptxas-report.sh

clean:
	$(CARGO) clean
	rm -rf dist
