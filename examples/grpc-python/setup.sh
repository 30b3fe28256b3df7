#!/usr/bin/env bash
# Prepares the Python client: a venv with grpcio and grpcio-tools from PyPI (pinned), and stubs
# generated from the portmesh protos. Idempotent and quick when already prepared.
#
#   examples/grpc-python/setup.sh [VENV]      (default: target/grpc-python-venv)
#
# Prints the venv's python on the last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${1:-$root/target/grpc-python-venv}
stamp=$venv/.portmesh-ready
proto=$root/proto/portmesh/v1/portmesh.proto
# One setup at a time: tests that use the client run at once, and two pip installs into one new
# venv break each other.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ ! -f "$stamp" ] || [ "$proto" -nt "$stamp" ] || [ "$here/requirements.txt" -nt "$stamp" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
    rm -rf "$venv/portmesh-stubs"
    mkdir -p "$venv/portmesh-stubs"
    "$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" \
        --python_out="$venv/portmesh-stubs" --grpc_python_out="$venv/portmesh-stubs" "$proto" >&2
    touch "$stamp"
fi
echo "$venv/bin/python"
