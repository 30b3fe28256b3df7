"""The Flask extension: the app's port, its registration, and its dependencies' addresses.

    from flask import Flask
    from portmesh.flask import PortMesh

    pm = PortMesh()

    def create_app():
        app = Flask(__name__)
        app.config["PORTMESH_URLS"] = {"CACHE_REDIS_URL": "redis://localhost:{redis.port}/0"}
        pm.init_app(app)          # app.config["PORTMESH_PORT"] is the app's port from here on
        return app

Configuration (`app.config`, all optional):

- ``PORTMESH_SERVICE``: the service name [default: the app's name].
- ``PORTMESH_POOL``, ``PORTMESH_KEY``, ``PORTMESH_TTL`` (seconds, default 30): as for
  :func:`portmesh.hold`; the key defaults to ``PROJECT/SERVICE``.
- ``PORTMESH_REGISTER`` (default True): register the app as a service others can discover.
- ``PORTMESH_HEALTHZ`` (default False): add a ``/healthz`` route answering ``ok``, and check the
  registration with it (else the node checks the port with a TCP connect).
- ``PORTMESH_URLS``: config keys to fill from other services' ports, as ``portmesh.toml`` does:
  ``{"SQLALCHEMY_DATABASE_URI": "postgresql://localhost:{db.port}/app"}``. Under ``portmesh up``
  the ports come from the stack's variables; alone, from the registry (:func:`portmesh.discover`).
  Filled before other extensions read the config, so Flask-SQLAlchemy or Flask-Caching need no
  change.

How it gets the port: under ``portmesh up`` or ``portmesh run`` it takes the one they give
(``PORT``) and changes nothing else (they register the service and hold the lease). Alone, it
holds the app's sticky port under a lease kept for the life of the process, registers the service,
and ``app.run()`` listens there unless given another port. With the reloader, the serving child
takes the port its parent holds instead of a second one. ``flask run`` binds the port it was told
(``--port``, ``FLASK_RUN_PORT``, else 5000), which no extension can change: under a plain
``flask run`` the extension takes that port as the app's, holds and registers nothing (a
registration would point at a port nobody serves), and says on stderr to run ``portmesh run --
flask run`` instead, which sets ``FLASK_RUN_PORT`` to the app's sticky port.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import portmesh

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

#: Where a parent process (the reloader's) leaves the port it holds for its serving child.
_INHERITED = "PORTMESH_FLASK_PORT"


class AppPort:
    """What the extension did for one app (``app.extensions["portmesh"]``): its port, the lease
    it holds when run alone (None under ``portmesh up``/``run`` or in the reloader's child), and
    its registration id."""

    def __init__(self, port: int, held: Optional[portmesh.Held], registration: Optional[str]) -> None:
        self.port = port
        self.held = held
        self.registration = registration

    def release(self) -> None:
        """Lets the port (and the registration on its lease) go now rather than at exit."""
        if self.held is not None:
            self.held.release()


class PortMesh:
    """The extension: ``PortMesh(app)``, or ``pm = PortMesh()`` and ``pm.init_app(app)`` in an
    app factory (one instance serves any number of apps; each app's state is in
    ``app.extensions["portmesh"]``, an :class:`AppPort`)."""

    def __init__(self, app: Any = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        """Sets ``app.config["PORTMESH_PORT"]`` (and the ``PORTMESH_URLS`` keys), and, run alone,
        holds and registers the app's port."""
        cfg = app.config
        service = cfg.get("PORTMESH_SERVICE") or app.name
        cfg.setdefault("PORTMESH_SERVICE", service)
        stack = portmesh.stack_env()
        # The dependencies first: one that is missing is named before anything is held.
        urls = {
            key: fill(template, stack_ports=os.environ if stack.service else None)
            for key, template in (cfg.get("PORTMESH_URLS") or {}).items()
        }
        held: Optional[portmesh.Held] = None
        registration: Optional[str] = None
        flask_run = _flask_run_port()
        if stack.service and stack.port:
            # Under `portmesh up` / `portmesh run`: they hold, register and release.
            port = stack.port
        elif flask_run is not None:
            # A plain `flask run`: it binds the port it was told, whatever is held here.
            port = flask_run
            if os.environ.get("WERKZEUG_RUN_MAIN") != "true":
                sys.stderr.write(
                    f"portmesh: `flask run` listens on port {port}, the one it was told (--port, FLASK_RUN_PORT, "
                    "else 5000), so nothing is held or registered: for the app's own port run "
                    "`portmesh run -- flask run`\n"
                )
        elif os.environ.get("WERKZEUG_RUN_MAIN") == "true" and os.environ.get(_INHERITED, "").isdigit():
            # The reloader's serving child: its parent holds the port.
            port = int(os.environ[_INHERITED])
        else:
            held = portmesh.hold(
                service,
                ttl=float(cfg.get("PORTMESH_TTL", 30)),
                pool=cfg.get("PORTMESH_POOL"),
                key=cfg.get("PORTMESH_KEY"),
            )
            port = held.port
            os.environ[_INHERITED] = str(port)
            if cfg.get("PORTMESH_REGISTER", True):
                # On the lease: the registration goes with the port, however the process ends.
                check = "http:/healthz" if cfg.get("PORTMESH_HEALTHZ") else "tcp"
                registration = portmesh.register(service, port, check=check, lease=held.lease_id)
        state = AppPort(port, held, registration)
        cfg["PORTMESH_PORT"] = port
        if cfg.get("PORTMESH_HEALTHZ"):
            app.add_url_rule("/healthz", "portmesh_healthz", lambda: "ok\n")
        cfg.update(urls)
        original = app.run

        @functools.wraps(original)
        def run(host: Optional[str] = None, port: Optional[int] = None, **options: Any) -> Any:
            return original(host, port if port is not None else state.port, **options)

        app.run = run
        app.extensions["portmesh"] = state


def _flask_run_port() -> Optional[int]:
    """The port ``flask run`` binds when it is the one loading the app (its click command's
    ``port``), else None."""
    click = sys.modules.get("click")
    ctx = click.get_current_context(silent=True) if click is not None else None
    while ctx is not None:
        if ctx.info_name == "run" and isinstance(ctx.params.get("port"), int):
            return int(ctx.params["port"])
        ctx = ctx.parent
    return None


_REF = re.compile(r"\{([A-Za-z0-9_.-]+)\.port(?:_([A-Za-z0-9_]+))?\}")


def fill(template: str, stack_ports: Optional[Any] = None) -> str:
    """Replaces ``{SERVICE.port}`` (and ``{SERVICE.port_NAME}``) in `template` with the ports of
    service SERVICE: from the stack's ``SERVICE_PORT`` variables in `stack_ports` when given
    (under ``portmesh up``), else from a healthy registered instance."""

    def port_of(m: "re.Match[str]") -> str:
        service, name = m.group(1), m.group(2)
        if stack_ports is not None:
            var = re.sub(r"[^A-Z0-9]", "_", service.upper()) + "_PORT" + (f"_{name.upper()}" if name else "")
            if stack_ports.get(var, "").isdigit():
                return str(stack_ports[var])
        found = portmesh.discover(service)
        if not found:
            raise portmesh.NotFound(
                f"PORTMESH_URLS refers to service {service!r}, but no healthy instance is registered: "
                f"start it (e.g. `portmesh run --service {service} -- ...`)",
                kind="not_found",
            )
        ports: Dict[str, int] = found[0].ports
        if name:
            if name not in ports:
                raise portmesh.NotFound(f"service {service!r} has no port named {name!r}", kind="not_found")
            return str(ports[name])
        return str(found[0].port)

    return _REF.sub(port_of, template)
