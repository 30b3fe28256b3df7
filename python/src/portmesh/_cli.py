"""Running the `portmesh` executable: the one way this package talks to a node.

Every call is the CLI with `--json`, so the package finds and starts the embedded local node exactly
as the CLI does, and honours the same variables (PORTMESH_NODE, PORTMESH_TEAM, PORTMESH_HOME,
PORTMESH_TLS_CA/CERT/KEY, PORTMESH_TOKEN, PORTMESH_TOKEN_FILE).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

from .errors import PortmeshError, error_for


_found = ""


def find_binary() -> str:
    """The `portmesh` executable: $PORTMESH_BIN, else the one this package was installed with (the
    scripts directory of its environment), else the first on PATH. Found once per process."""
    global _found
    explicit = os.environ.get("PORTMESH_BIN")
    if explicit:
        return explicit
    if _found:
        return _found
    name = "portmesh.exe" if sys.platform == "win32" else "portmesh"
    runnable = lambda c: os.path.isfile(c) and os.access(c, os.X_OK)  # noqa: E731
    # The interpreter's own directory first: in a venv it is the scripts directory, and looking
    # there imports nothing (`sysconfig` and `shutil` cost milliseconds at every start).
    here = os.path.join(os.path.dirname(sys.executable), name)
    if runnable(here):
        _found = here
        return here
    import shutil
    import sysconfig

    candidates = [os.path.join(sysconfig.get_path("scripts"), name)]
    user_scheme = "nt_user" if sys.platform == "win32" else "posix_user"
    try:
        candidates.append(os.path.join(sysconfig.get_path("scripts", scheme=user_scheme), name))
    except KeyError:
        pass
    found = next((c for c in candidates if runnable(c)), None) or shutil.which(name)
    if found:
        _found = found
        return found
    raise PortmeshError(
        "cannot find the portmesh executable: install the package with pip (it brings the "
        "executable), put portmesh on PATH, or set PORTMESH_BIN",
        kind="not_installed",
    )


def _command(args: List[str], team: Optional[str], node: Optional[str], json: bool) -> List[str]:
    cmd = [find_binary()] + (["--json"] if json else [])
    if team:
        cmd += ["--team", team]
    if node:
        cmd += ["--node", node]
    return cmd + args


def _spawn(cmd: List[str]) -> Tuple[int, str, str]:
    """Runs `cmd` with no input; its exit code, standard output and error. `os.posix_spawn`
    where there is one: the `subprocess` module alone costs ~5 ms to import, on every start of an
    app that asks for its port."""
    env = dict(os.environ, PORTMESH_ERROR_FORMAT="json")
    if not hasattr(os, "posix_spawn"):
        import subprocess

        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    try:
        pid = os.posix_spawn(
            cmd[0],
            cmd,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, w_out, 1),
                (os.POSIX_SPAWN_DUP2, w_err, 2),
                (os.POSIX_SPAWN_CLOSE, r_out),
                (os.POSIX_SPAWN_CLOSE, r_err),
            ],
        )
    finally:
        os.close(w_out)
        os.close(w_err)
    # The answer first, then the error: an error is one line, far below a pipe's buffer, so the
    # command never waits on a full standard error while this reads its output.
    out, err = _read_all(r_out), _read_all(r_err)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err


def _read_all(fd: int) -> str:
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def run(args: List[str], *, team: Optional[str] = None, node: Optional[str] = None) -> Dict[str, Any]:
    """Runs `portmesh --json ARGS` and returns its JSON answer; raises the error it reports."""
    code, out, err = _spawn(_command(args, team, node, json=True))
    if code != 0:
        raise _error(err)
    import json

    out = out.strip()
    return json.loads(out) if out else {}


def run_plain(args: List[str], *, team: Optional[str] = None, node: Optional[str] = None) -> str:
    """Runs `portmesh ARGS` and returns what it printed (for answers simple enough to read
    without a JSON parser); raises the error it reports."""
    code, out, err = _spawn(_command(args, team, node, json=False))
    if code != 0:
        raise _error(err)
    return out


def _error(stderr: str) -> PortmeshError:
    import json

    for line in reversed(stderr.strip().splitlines()):
        try:
            reported = json.loads(line)
        except ValueError:
            continue
        if isinstance(reported, dict) and "error" in reported:
            return error_for(str(reported["error"]), str(reported.get("kind") or "error"))
    return PortmeshError(stderr.strip() or "portmesh failed with no message", kind="error")


def keeper(lease: int, *, team: Optional[str] = None, node: Optional[str] = None) -> Any:
    """Starts `portmesh renew --lease ID --keep`: it renews the lease until its standard input
    closes (this process ends, however it ends), then revokes it. In a session of its own, so a
    terminal's Ctrl-C reaches the application, not the keeper."""
    import subprocess

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
