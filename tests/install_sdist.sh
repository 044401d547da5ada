#!/usr/bin/env bash
# The sdist, built from scratch: pip builds it in a clean virtual environment (the Rust extension
# compiled from the sdist's sources) and installs it there; then the installed package runs the
# store tests and cache -> train -> eval on the embedded digits.
# Usage: tests/install_sdist.sh dbcore-X.tar.gz [SITE_PACKAGES]
# With SITE_PACKAGES, the runtime dependencies (torch, ...) are taken from that folder through a
# .pth file instead of being downloaded again (`make sdist-test` passes the project venv's); the
# sdist's own dbcore comes first on the path, and the script checks that it is the one imported.
# The sdist is always built afresh (`--no-cache-dir`): pip caches the wheel it builds from a local
# archive by its path and version, and a clone at a reused path would install a stale extension.
set -euo pipefail
sdist="$(realpath "$1")"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# maturin's sdist gives every file one fixed old mtime, so cargo would take an earlier build of this
# crate in a reused CARGO_TARGET_DIR for up to date: drop the crate's own outputs (its dependencies
# stay built).
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
    rm -rf "$CARGO_TARGET_DIR"/release/.fingerprint/dbcore-native-* "$CARGO_TARGET_DIR"/release/deps/_native.d \
        "$CARGO_TARGET_DIR"/release/deps/lib_native.so "$CARGO_TARGET_DIR"/release/lib_native.*
fi
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
if [[ $# -ge 2 ]]; then
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$(realpath "$2")" > "$site/zz_dependencies.pth"
    "$py" -m pip install -q --no-deps --no-cache-dir "$sdist"
else
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q pytest
    "$py" -m pip install -q --no-cache-dir "$sdist"
fi
cd "$work"  # nothing of the source tree on the path: only the installed package
"$py" - "$work" <<'PY'
import importlib.resources as resources
import sys
import dbcore, dbcore._native
assert dbcore._native.__file__.startswith(sys.argv[1]), f"imported {dbcore._native.__file__}, not the sdist's"
kernels = {p.name for p in resources.files("dbcore.kernels").joinpath("cuda").iterdir()}
assert {"loss_mse.cu", "loss_ce.cu", "noise.cu"} <= kernels, kernels
print("sdist install:", dbcore.__version__, dbcore._native.__file__)
PY
"$work/venv/bin/dbcore" cache "$repo/configs/vit_digits.toml" --data digits:train --out "$work/c.zarr"
"$work/venv/bin/dbcore" train "$repo/configs/vit_digits.toml" --store "$work/c.zarr" --out "$work/run" \
    --steps 20 --quiet
"$work/venv/bin/dbcore" eval "$work/run" --data digits:valid --json
cd "$repo"
"$py" -m pytest -q -p no:cacheprovider tests/test_store.py tests/test_store_errors.py
