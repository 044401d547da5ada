#!/usr/bin/env bash
# The sdist, built from scratch: a clean virtual environment installs it with pip (the Rust
# extension compiled from the sdist's sources), then the installed package runs the store tests
# and cache -> train -> eval on the embedded digits. Usage: tests/install_sdist.sh dbcore-X.tar.gz
set -euo pipefail
sdist="$(realpath "$1")"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$sdist" pytest
cd "$work"  # nothing of the source tree on the path: only the installed package
"$py" - <<'PY'
import importlib.resources as resources
import dbcore, dbcore._native
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
