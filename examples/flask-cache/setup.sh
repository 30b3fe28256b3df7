#!/usr/bin/env bash
# Installs Redis (server and redis-cli) from Debian's packages if missing. Idempotent; prints
# the server's path on the last line.
set -euo pipefail
found() {
    if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
        command -v redis-server
        exit 0
    fi
}
found
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# One apt at a time: tests run at once may each need a package (apt-get does not wait for
# another's lock by itself).
exec 9>/tmp/portmesh-apt.lock
flock 9
found # another test may have installed it while we waited
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server >&2
command -v redis-server
