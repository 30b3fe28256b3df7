#!/usr/bin/env bash
# Prepares the Python package's tests: a venv (target/python-venv) with pytest, maturin and
# vermin from PyPI (pinned), and this package installed into it the way users install it
# (`pip install ./python`: maturin builds the portmesh executable from the workspace). The
# build reuses the workspace's target directory and its dev profile, so after `cargo build` it
# only links. Idempotent; the package is reinstalled each time (the executable may have changed).
#
#   python/setup-tests.sh            prints the venv's python on the last line
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=${CARGO_TARGET_DIR:-$root/target}/python-venv
stamp=$venv/.portmesh-tools
if [ ! -f "$stamp" ] || [ "$here/requirements-test.txt" -nt "$stamp" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements-test.txt" >&2
    touch "$stamp"
fi
PATH="$venv/bin:$PATH" CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target} MATURIN_PEP517_ARGS="--profile dev" \
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps "$here" >&2
echo "$venv/bin/python"
