"""portmesh: ports that never collide, from Python.

    import portmesh

    port = portmesh.port("web")              # the same port for this project's "web" every time
    with portmesh.hold("worker", ttl=30) as held:
        serve(held.port)                      # held for as long as this block (or process) runs
    api = portmesh.discover("api")            # where the other services listen
    url = portmesh.url_for("api", "/v1/items")

Every call runs the `portmesh` executable installed with this package (the CLI, `--json`), so it
finds (and on a fresh machine starts) this machine's node exactly as the CLI does, and honours
the same variables: PORTMESH_NODE (a team cluster), PORTMESH_TEAM, PORTMESH_HOME, PORTMESH_TLS_CA /
PORTMESH_TLS_CERT / PORTMESH_TLS_KEY, PORTMESH_TOKEN / PORTMESH_TOKEN_FILE. Failures raise
:class:`PortmeshError` subclasses carrying the node's message and category.
"""

from __future__ import annotations

import atexit
import os

# Annotations only (postponed): `typing` costs ~12 ms at import, paid on every start of an app.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

from . import _cli
from .errors import (
    FailedPrecondition,
    InvalidArgument,
    NodeUnreachable,
    NotFound,
    OutcomeUnknown,
    PoolExhausted,
    PortmeshError,
    PortUnavailable,
    Unauthorized,
)

__all__ = [
    "Held",
    "Service",
    "StackEnv",
    "port",
    "ports",
    "release",
    "hold",
    "register",
    "deregister",
    "discover",
    "url_for",
    "stack_env",
    "default_key",
    "PortmeshError",
    "PoolExhausted",
    "PortUnavailable",
    "FailedPrecondition",
    "NotFound",
    "InvalidArgument",
    "NodeUnreachable",
    "Unauthorized",
    "OutcomeUnknown",
]


def __getattr__(name: str) -> Any:
    # `portmesh.__version__`, read from the installed package's metadata only when asked for:
    # importlib.metadata costs tens of milliseconds at import, on every start of an app.
    if name == "__version__":
        try:
            from importlib.metadata import version

            return version("portmesh")
        except Exception:  # not installed (run from a source tree)
            return "0+unknown"
    raise AttributeError(f"module 'portmesh' has no attribute {name!r}")


def default_key(service: str) -> str:
    """The sticky key `port()` and `hold()` use when none is given: `PROJECT/SERVICE`, PROJECT
    being $PORTMESH_PROJECT (set by `portmesh up`) or the name of the current directory. The
    same project asking for the same service gets the same port tomorrow."""
    project = os.environ.get("PORTMESH_PROJECT") or os.path.basename(os.path.abspath(os.getcwd())) or "default"
    return f"{project}/{service}"


def _alloc_args(
    service: str,
    *,
    pool: Optional[str],
    key: Optional[str],
    want: Optional[int],
    strategy: Optional[str],
    ttl: Optional[float],
    lease: Optional[int],
) -> List[str]:
    args = ["alloc", service, "--key", key if key is not None else default_key(service)]
    if pool:
        args += ["--pool", pool]
    if want is not None:
        args += ["--port", str(want)]
    if strategy:
        args += ["--strategy", strategy]
    if ttl is not None:
        args += ["--ttl", f"{int(ttl * 1000)}ms"]
    if lease is not None:
        args += ["--lease", str(lease)]
    return args


def port(
    service: str,
    *,
    pool: Optional[str] = None,
    key: Optional[str] = None,
    want: Optional[int] = None,
    strategy: Optional[str] = None,
    ttl: Optional[float] = None,
    lease: Optional[int] = None,
    team: Optional[str] = None,
    node: Optional[str] = None,
) -> int:
    """A port for `service`, held until released (or, with `ttl` seconds, until its lease lapses
    unrenewed; see :func:`hold` to keep one for the life of the process).

    Sticky: the same `key` (default :func:`default_key`) gets the same port again while it is
    held, and the port it had last once released. `pool` defaults as the CLI's does (a pool
    named like the service, else `default`); `want` asks for a port, with `strategy` (`sticky`,
    `next`, `random`, `fail`) saying what to do if it is taken. Raises :class:`PoolExhausted`,
    :class:`PortUnavailable`, :class:`NodeUnreachable`, ... with the node's message.
    """
    args = _alloc_args(service, pool=pool, key=key, want=want, strategy=strategy, ttl=ttl, lease=lease)
    # The plain answer (one port per line) needs no JSON parser: the common call stays cheap.
    return int(_cli.run_plain(args, team=team, node=node).split()[0])


def ports(*services: str, pool: Optional[str] = None, team: Optional[str] = None) -> Dict[str, int]:
    """A sticky port for each of `services` (keys :func:`default_key`), as a dict."""
    return {s: port(s, pool=pool, team=team) for s in services}


def release(
    port: Optional[int] = None,
    *,
    key: Optional[str] = None,
    lease: Optional[int] = None,
    team: Optional[str] = None,
    node: Optional[str] = None,
) -> List[int]:
    """Releases a port, the port of a sticky key, or everything attached to a lease. Returns the
    ports released."""
    args = ["release"]
    if port is not None:
        args.append(str(port))
    if key is not None:
        args += ["--key", key]
    if lease is not None:
        args += ["--lease", str(lease)]
    if len(args) == 1:
        raise InvalidArgument("release needs a port, key= or lease=", kind="invalid_argument")
    reply = _cli.run(args, team=team, node=node)
    return [int(a["port"]) for a in reply.get("released", [])]


class Held:
    """A port held under a lease that a keeper process renews for as long as this process runs.
    The lease ends (and the port comes back) on :meth:`release`, at interpreter exit, or when this
    process dies in any way, since the keeper then sees its standard input close."""

    def __init__(self, port: int, lease_id: int, service: str, key: str, keeper: Any = None) -> None:
        import threading

        self.port = port
        self.lease_id = lease_id
        self.service = service
        self.key = key
        self._keeper = keeper
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Held(port={self.port}, lease_id={self.lease_id}, service={self.service!r}, key={self.key!r})"

    def alive(self) -> bool:
        """Whether the lease is still kept (False once released, or if the keeper lost it)."""
        return self._keeper is not None and self._keeper.poll() is None

    def release(self) -> None:
        """Ends the lease: the keeper revokes it and exits. Safe to call twice."""
        with self._lock:
            keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        try:
            if keeper.stdin:
                keeper.stdin.close()
            keeper.wait(timeout=15)
        except Exception:
            keeper.kill()

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_held: List[Held] = []

#: Concurrent holders of one project's service that each get a sticky slot of their own.
_MAX_SLOTS = 32


@atexit.register
def _release_all() -> None:
    for h in list(_held):
        h.release()


def hold(
    service: str,
    *,
    ttl: float = 30.0,
    pool: Optional[str] = None,
    key: Optional[str] = None,
    want: Optional[int] = None,
    strategy: Optional[str] = None,
    team: Optional[str] = None,
    node: Optional[str] = None,
) -> Held:
    """A sticky port for `service` under a lease of `ttl` seconds, kept alive for the life of
    this process (a context manager too). When the process ends, however it ends, the lease is
    revoked and the port comes back. Without `key`, a second process holding the same service of
    the same project at the same time takes a sticky slot of its own (``PROJECT/SERVICE#2``, ...),
    as ``portmesh run`` does, rather than share the first one's port."""
    base = key if key is not None else default_key(service)
    for slot in range(1, _MAX_SLOTS + 1):
        chosen = base if slot == 1 or key is not None else f"{base}#{slot}"
        args = _alloc_args(service, pool=pool, key=chosen, want=want, strategy=strategy, ttl=ttl, lease=None)
        reply = _cli.run(args, team=team, node=node)
        lease_id = int(reply["lease_id"])
        if key is not None or all(int(a.get("lease_id") or 0) == lease_id for a in reply["allocations"]):
            break
        # The slot's port is held by another process: our new lease holds nothing; let it go.
        _cli.run(["release", "--lease", str(lease_id)], team=team, node=node)
    else:
        raise FailedPrecondition(
            f"{_MAX_SLOTS} processes hold {base!r} at once: give this one a key of its own", kind="failed_precondition"
        )
    held = Held(
        port=int(reply["allocations"][0]["port"]),
        lease_id=lease_id,
        service=service,
        key=chosen,
        keeper=_cli.keeper(lease_id, team=team, node=node),
    )
    _held.append(held)
    return held


class _Record:
    """A small immutable record: fields set once, compared and shown by value."""

    __slots__: Tuple[str, ...] = ()

    def __init__(self, **values: Any) -> None:
        for k in self.__slots__:
            object.__setattr__(self, k, values.get(k))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, k)) for k in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Service(_Record):
    """A registered service: where it listens and how healthy it is (`name`, `id`, `host`,
    `ports` by name, `status`, `tags`)."""

    __slots__ = ("name", "id", "host", "ports", "status", "tags")
    name: str
    id: str
    host: str
    ports: Dict[str, int]
    status: str
    tags: Tuple[str, ...]

    @property
    def port(self) -> int:
        """The main (first) port."""
        return next(iter(self.ports.values()))


def register(
    name: str,
    port: int,
    *,
    check: Optional[str] = None,
    tags: Tuple[str, ...] = (),
    id: Optional[str] = None,
    lease: Optional[int] = None,
    team: Optional[str] = None,
    node: Optional[str] = None,
) -> str:
    """Registers `name` at `port` on this host, with an optional health check the node runs
    (`tcp`, `http:/PATH`, `grpc[:SERVICE]`, `cmd:COMMAND`). With `lease` (e.g. a
    :class:`Held`'s `lease_id`) the registration ends with the lease. Returns the registration
    id."""
    args = ["register", name, "--port", str(port)]
    if lease is not None:
        args += ["--lease", str(lease)]
    if check:
        args += ["--check", check]
    for t in tags:
        args += ["--tag", t]
    if id:
        args += ["--id", id]
    return str(_cli.run(args, team=team, node=node)["id"])


def deregister(id: str, *, team: Optional[str] = None, node: Optional[str] = None) -> None:
    """Removes a registration by id."""
    _cli.run(["deregister", id], team=team, node=node)


def discover(
    name: str, *, all: bool = False, team: Optional[str] = None, node: Optional[str] = None
) -> List[Service]:
    """The instances of service `name`: healthy ones (passing or warning) unless `all`."""
    args = ["discover", name] + (["--all"] if all else [])
    reply = _cli.run(args, team=team, node=node)
    return [
        Service(
            name=s["name"],
            id=s["id"],
            host=s["host"],
            ports={p["name"]: int(p["port"]) for p in s["ports"]},
            status=s["status"],
            tags=tuple(s.get("tags") or ()),
        )
        for s in reply.get("services", [])
    ]


def url_for(name: str, path: str = "", *, scheme: str = "http", team: Optional[str] = None) -> str:
    """A URL of a healthy instance of `name` (`http://HOST:PORT/path`). Raises :class:`NotFound`
    when none is healthy."""
    found = discover(name, team=team)
    if not found:
        raise NotFound(f"no healthy instance of service {name!r} is registered", kind="not_found")
    s = found[0]
    host = "localhost" if s.host in ("", _hostname()) else s.host
    return f"{scheme}://{host}:{s.port}{path}"


def _hostname() -> str:
    import socket

    return socket.gethostname()


class StackEnv(_Record):
    """What `portmesh up` or `portmesh run` told this process: its service, main port, named
    ports and lease. `service` is None when the process was started some other way."""

    __slots__ = ("service", "port", "ports", "lease_id", "project", "env")
    service: Optional[str]
    port: Optional[int]
    ports: Dict[str, int]
    lease_id: Optional[int]
    project: Optional[str]
    env: Optional[str]


def stack_env(environ: Optional[Dict[str, str]] = None) -> StackEnv:
    """Reads the variables `portmesh up`/`run` set (PORTMESH_SERVICE, PORT, PORT_<NAME>,
    PORTMESH_LEASE, PORTMESH_PROJECT, PORTMESH_ENV)."""
    e = os.environ if environ is None else environ
    named = {k[len("PORT_"):].lower(): int(v) for k, v in e.items() if k.startswith("PORT_") and v.isdigit()}
    lease = e.get("PORTMESH_LEASE")
    return StackEnv(
        service=e.get("PORTMESH_SERVICE"),
        port=int(e["PORT"]) if e.get("PORT", "").isdigit() else None,
        ports=named,
        lease_id=int(lease) if lease and lease.isdigit() else None,
        project=e.get("PORTMESH_PROJECT"),
        env=e.get("PORTMESH_ENV"),
    )
