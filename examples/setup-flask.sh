#!/usr/bin/env bash
# Prepares a venv with Flask, gunicorn and the redis client from PyPI (pinned in
# requirements-flask.txt) for the Flask examples. Idempotent and quick when already prepared.
#
#   examples/setup-flask.sh [VENV]      (default: target/flask-venv)
#
# Prints the venv's bin directory on the last line: put it first on PATH to run the examples.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=${1:-$root/target/flask-venv}
stamp=$venv/.portmesh-ready
# Tests run at once may all ask for the venv: one builds it, the others wait.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ ! -f "$stamp" ] || [ "$here/requirements-flask.txt" -nt "$stamp" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements-flask.txt" >&2
    touch "$stamp"
fi
echo "$venv/bin"
