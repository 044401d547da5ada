# The two commands a newcomer needs: `make demo` and `make test`. Each creates or updates the
# virtual environment and installs the freshly built wheel (never an editable copy).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export CARGO_TARGET_DIR ?= $(HOME)/.cache/dbcore/cargo-target
export PIP_CACHE_DIR ?= $(HOME)/.cache/pip

.PHONY: demo test venv wheel sdist sdist-test install lint stubtest pytest cargo-test fuzz \
	fuzz-libfuzzer bench clean

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip "maturin>=1.9,<2" "ziglang>=0.13" "auditwheel>=6"

# manylinux_2_28 (RHEL 8, Ubuntu 20.04 and later): linked by zig against glibc 2.28, checked by auditwheel
wheel: venv
	rm -rf dist
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --quiet -o dist \
		--interpreter $(PY) --zig --compatibility manylinux_2_28
	$(VENV)/bin/auditwheel show dist/dbcore-*.whl | grep 'manylinux_2_28_x86_64' > /dev/null \
		|| { echo "wheel is not manylinux_2_28"; exit 1; }

# the sdist, and a clean virtual environment that builds and installs it with pip (own cargo cache)
sdist: venv
	rm -rf dist/sdist
	$(VENV)/bin/maturin sdist -o dist/sdist

# the runtime dependencies come from the project venv's site-packages (no second torch download)
sdist-test: sdist
	CARGO_TARGET_DIR=$(HOME)/.cache/dbcore/cargo-target-sdist bash tests/install_sdist.sh \
		dist/sdist/dbcore-*.tar.gz "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

install: wheel
	$(PY) -m pip install -q "$$(ls dist/dbcore-*.whl)[dev]"
	$(PY) -m pip install -q --force-reinstall --no-deps dist/dbcore-*.whl

lint: venv
	$(VENV)/bin/ruff check python tests benches
	cargo clippy --all-targets -- -D warnings

# the stub python/dbcore/_native.pyi against the installed extension: it cannot drift
stubtest: install
	cd /tmp && $(abspath $(PY)) -m mypy.stubtest dbcore._native

pytest: install
	$(VENV)/bin/pytest -q

cargo-test:
	cargo test --quiet

# The reader against corrupt stores (rust/fuzzing/case.rs) for FUZZ_SECONDS from a fresh seed;
# `make test` runs a bounded number of cases. A failure prints the command that reruns its case.
FUZZ_SECONDS ?= 300
FUZZ_SEED ?= $(shell date +%s)
fuzz:
	DBCORE_FUZZ_SECONDS=$(FUZZ_SECONDS) DBCORE_FUZZ_SEED=$(FUZZ_SEED) \
		cargo test --release --test fuzz_reader fuzz_reader -- --nocapture

# The same case, coverage-guided: needs the nightly toolchain and `cargo install cargo-fuzz`.
fuzz-libfuzzer:
	cargo +nightly fuzz run reader -- -max_total_time=$(FUZZ_SECONDS) -timeout=60

test: install lint stubtest cargo-test pytest sdist-test

demo: install
	rm -rf demo/run_e2e demo/run_blocks
	$(PY) -m dbcore.demo configs/vit_digits.toml --workdir demo

bench: install
	$(PY) benches/bench_store.py

clean:
	rm -rf dist $(VENV)
