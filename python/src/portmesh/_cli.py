"""Running the `portmesh` executable: the one way this package talks to a node.

Every call is the CLI with `--json`, so the package finds and starts the embedded local node exactly
as the CLI does, and honours the same variables (PORTMESH_NODE, PORTMESH_TEAM, PORTMESH_HOME,
PORTMESH_TLS_CA/CERT/KEY, PORTMESH_TOKEN, PORTMESH_TOKEN_FILE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

from .errors import PortmeshError, error_for


def find_binary() -> str:
    """The `portmesh` executable: $PORTMESH_BIN, else the one this package was installed with (the
    scripts directory of its environment), else the first on PATH."""
    explicit = os.environ.get("PORTMESH_BIN")
    if explicit:
        return explicit
    import shutil
    import sysconfig

    name = "portmesh.exe" if sys.platform == "win32" else "portmesh"
    candidates = [os.path.join(sysconfig.get_path("scripts"), name)]
    user_scheme = "nt_user" if sys.platform == "win32" else "posix_user"
    try:
        candidates.append(os.path.join(sysconfig.get_path("scripts", scheme=user_scheme), name))
    except KeyError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return found
    raise PortmeshError(
        "cannot find the portmesh executable: install the package with pip (it brings the "
        "executable), put portmesh on PATH, or set PORTMESH_BIN",
        kind="not_installed",
    )


def run(args: List[str], *, team: Optional[str] = None, node: Optional[str] = None) -> Dict[str, Any]:
    """Runs `portmesh --json ARGS` and returns its JSON answer; raises the error it reports."""
    cmd = [find_binary(), "--json"]
    if team:
        cmd += ["--team", team]
    if node:
        cmd += ["--node", node]
    cmd += args
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _error(proc.stderr)
    out = proc.stdout.strip()
    return json.loads(out) if out else {}


def _error(stderr: str) -> PortmeshError:
    for line in reversed(stderr.strip().splitlines()):
        try:
            reported = json.loads(line)
        except ValueError:
            continue
        if isinstance(reported, dict) and "error" in reported:
            return error_for(str(reported["error"]), str(reported.get("kind") or "error"))
    return PortmeshError(stderr.strip() or "portmesh failed with no message", kind="error")


def keeper(lease: int, *, team: Optional[str] = None, node: Optional[str] = None) -> "subprocess.Popen[bytes]":
    """Starts `portmesh renew --lease ID --keep`: it renews the lease until its standard input
    closes (this process ends, however it ends), then revokes it. In a session of its own, so a
    terminal's Ctrl-C reaches the application, not the keeper."""
    cmd = [find_binary(), "--json"]
    if team:
        cmd += ["--team", team]
    if node:
        cmd += ["--node", node]
    cmd += ["renew", "--lease", str(lease), "--keep"]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
