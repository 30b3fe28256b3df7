"""The Flask extension with real Flask, in an app factory."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from flask import Flask

import portmesh
from conftest import in_pool
from portmesh.flask import PortMesh

pm = PortMesh()


def run_fd(pool, service, program, *args):
    """`portmesh run --fd` of `program` (from this venv) as `service`: the process and its port."""
    bin_dir = os.path.dirname(sys.executable)
    run = subprocess.Popen(
        [os.path.join(bin_dir, "portmesh"), "run", "--fd", "--pool", pool, "--service", service,
         "--key", f"fd/{service}", "--", os.path.join(bin_dir, program), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = run.stderr.readline()
    assert f"{service} runs on port " in line, line
    return run, int(line.rsplit(" ", 1)[1])


def get_when_served(port, path):
    """The body of GET `path` once something serves on `port` (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2).read()
        except OSError:
            assert time.monotonic() < deadline, f"nothing served on port {port}"
            time.sleep(0.1)


def create_app(**config):
    app = Flask("shop")
    app.config.update(config)
    pm.init_app(app)
    return app


def test_an_app_factory_gets_its_sticky_port_registered_and_its_dependencies_urls(pool):
    cache_port = portmesh.port("cache", pool=pool, key="shop/cache")
    rid = portmesh.register("cache", cache_port)
    app = create_app(
        PORTMESH_POOL=pool,
        PORTMESH_KEY="shop/web",
        PORTMESH_URLS={"CACHE_REDIS_URL": "redis://localhost:{cache.port}/0"},
    )
    port = app.config["PORTMESH_PORT"]
    state = app.extensions["portmesh"]
    assert in_pool(port) and state.port == port and state.held is not None
    assert app.config["CACHE_REDIS_URL"] == f"redis://localhost:{cache_port}/0"
    # Registered under the app's name (not healthy yet: nothing serves there in this test).
    assert [s.port for s in portmesh.discover("shop", all=True)] == [port]
    # The same project and key get the same port back once this app lets it go.
    state.release()
    assert portmesh.discover("shop", all=True) == [], "the registration went with the lease"
    again = create_app(PORTMESH_POOL=pool, PORTMESH_KEY="shop/web", PORTMESH_REGISTER=False)
    assert again.config["PORTMESH_PORT"] == port
    again.extensions["portmesh"].release()
    portmesh.deregister(rid)
    portmesh.release(cache_port)


def test_under_portmesh_run_it_takes_the_port_it_is_given_and_holds_nothing(monkeypatch):
    monkeypatch.setenv("PORTMESH_SERVICE", "shop")
    monkeypatch.setenv("PORT", "31148")
    monkeypatch.setenv("DB_PORT", "31147")
    app = create_app(PORTMESH_URLS={"SQLALCHEMY_DATABASE_URI": "postgresql://localhost:{db.port}/shop"})
    assert app.config["PORTMESH_PORT"] == 31148
    assert app.extensions["portmesh"].held is None
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql://localhost:31147/shop"


def test_the_reloaders_child_takes_its_parents_port(monkeypatch):
    monkeypatch.setenv("WERKZEUG_RUN_MAIN", "true")
    monkeypatch.setenv("PORTMESH_FLASK_PORT", "31146")
    app = create_app()
    assert app.config["PORTMESH_PORT"] == 31146 and app.extensions["portmesh"].held is None


def test_a_missing_dependency_is_named_and_nothing_is_held(pool):
    with pytest.raises(portmesh.NotFound) as e:
        create_app(PORTMESH_POOL=pool, PORTMESH_KEY="shop/x", PORTMESH_URLS={"DB": "x://{nosuch.port}"})
    assert "service 'nosuch'" in str(e.value)
    with pytest.raises(portmesh.NotFound):
        portmesh.release(key="shop/x")


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "flask-factory", "app.py")


def test_app_run_serves_on_the_held_port_and_the_port_comes_back_when_it_is_killed(pool, tmp_path):
    # examples/flask-factory/app.py, as its docstring says to run it.
    env = dict(os.environ, FLASK_PORTMESH_POOL=pool, FLASK_PORTMESH_KEY="served/web", FLASK_PORTMESH_SERVICE="served")
    log = tmp_path / "app.stderr"
    with open(log, "wb") as err:
        server = subprocess.Popen([sys.executable, EXAMPLE], env=env, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while True:
            found = portmesh.discover("served")
            if found:
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{found[0].port}/healthz", timeout=2).read()
                    break
                except OSError:
                    pass
            assert time.monotonic() < deadline, (
                f"the app never served on its registered port (found {found}, app exit code {server.poll()}); "
                f"its stderr:\n{log.read_text(errors='replace')[-2000:]}"
            )
            time.sleep(0.1)
        assert body == b"ok\n" and in_pool(found[0].port)
        page = urllib.request.urlopen(f"http://127.0.0.1:{found[0].port}/", timeout=2).read()
        assert f'"port":{found[0].port}'.encode() in page.replace(b" ", b""), page
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    deadline = time.monotonic() + 15
    while portmesh.discover("served", all=True):
        assert time.monotonic() < deadline, "the registration outlived the killed app"
        time.sleep(0.1)


def test_under_gunicorn_with_a_handed_over_socket_the_app_takes_the_port_run_gives(pool, tmp_path):
    (tmp_path / "gapp.py").write_text(textwrap.dedent("""
        from flask import Flask
        from portmesh.flask import PortMesh

        def create_app():
            app = Flask("gapp")
            app.config["PORTMESH_HEALTHZ"] = True
            PortMesh(app)
            app.add_url_rule("/port", "port", lambda: str(app.config["PORTMESH_PORT"]))
            return app
    """))
    run, port = run_fd(pool, "gapp", "gunicorn", "--bind", "fd://3", "--chdir", str(tmp_path), "gapp:create_app()")
    try:
        body = get_when_served(port, "/port")
        assert body == str(port).encode(), "the extension took the port `portmesh run` gave, and held nothing else"
        assert [s.port for s in portmesh.discover("gapp", all=True)] == [port], "registered once, by run"
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=30)


def test_an_asgi_app_under_uvicorn_reads_its_port_from_the_stack_env(pool, tmp_path):
    (tmp_path / "asgi.py").write_text(textwrap.dedent("""
        import portmesh
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        env = portmesh.stack_env()
        app = Starlette(routes=[Route("/port", lambda request: PlainTextResponse(f"{env.service} {env.port}"))])
    """))
    run, port = run_fd(pool, "asgi", "uvicorn", "--fd", "3", "--app-dir", str(tmp_path), "asgi:app")
    try:
        body = get_when_served(port, "/port")
        assert body == f"asgi {port}".encode()
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=30)


def test_flask_caching_finds_redis_through_portmesh_urls_with_no_code_change(pool):
    # A real Redis on a port portmesh holds and registers (its setup is the Flask examples' own).
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    redis_server = subprocess.run(
        [os.path.join(root, "examples", "flask-cache", "setup.sh")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    bin_dir = os.path.dirname(sys.executable)
    redis = subprocess.Popen(
        [os.path.join(bin_dir, "portmesh"), "run", "--pool", pool, "--service", "redis", "--key", "c/redis",
         "--check", "tcp", "--", redis_server, "--port", "{port}", "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(redis.stderr.readline().rsplit(" ", 1)[1])
        deadline = time.monotonic() + 30
        while not portmesh.discover("redis"):
            assert time.monotonic() < deadline, "redis never became healthy"
            time.sleep(0.1)

        from flask_caching import Cache

        cache = Cache()
        app = Flask("cached")
        app.config.update(
            CACHE_TYPE="RedisCache",
            PORTMESH_POOL=pool,
            PORTMESH_KEY="c/web",
            PORTMESH_URLS={"CACHE_REDIS_URL": "redis://127.0.0.1:{redis.port}/0"},
        )
        pm.init_app(app)
        cache.init_app(app)  # reads CACHE_REDIS_URL as it was filled
        assert app.config["CACHE_REDIS_URL"] == f"redis://127.0.0.1:{port}/0"
        with app.app_context():
            cache.set("greeting", "hello")
            assert cache.get("greeting") == "hello"
        app.extensions["portmesh"].release()
    finally:
        redis.send_signal(signal.SIGINT)
        redis.wait(timeout=30)


def test_a_plain_flask_run_holds_and_registers_nothing_and_says_how_to_get_the_apps_port(pool):
    # A port of the tests' pool, free again: where `flask run` is told to listen.
    port = portmesh.port("flask-cli", pool=pool)
    portmesh.release(port)
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    env = dict(os.environ, FLASK_PORTMESH_POOL=pool, FLASK_PORTMESH_SERVICE="cli-served")
    server = subprocess.Popen(
        [flask, "--app", f"{EXAMPLE}:create_app", "run", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        page = get_when_served(port, "/")
        assert f'"port":{port}'.encode() in page.replace(b" ", b""), page
        assert portmesh.discover("cli-served", all=True) == []
    finally:
        server.terminate()
        _, err = server.communicate(timeout=15)
    assert f"`flask run` listens on port {port}" in err and "portmesh run -- flask run" in err, err
