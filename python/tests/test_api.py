"""The Python API against a real node (the local node the package starts, as the CLI does)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import portmesh
from conftest import in_pool


def child(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with this environment (the tests' home)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_a_port_is_sticky_across_processes(pool):
    first = child(f"import portmesh; print(portmesh.port('web', pool={pool!r}, key='proj/web'))")
    again = child(f"import portmesh; print(portmesh.port('web', pool={pool!r}, key='proj/web'))")
    assert first.returncode == 0, first.stderr
    p = int(first.stdout)
    assert in_pool(p)
    assert int(again.stdout) == p, "the same key gets the same port in another process"
    other = portmesh.port("api", pool=pool, key="proj/api")
    assert other != p
    assert portmesh.release(key="proj/web") == [p]
    assert portmesh.release(key="proj/api") == [other]


def test_the_default_key_is_the_project_and_the_service(pool, tmp_path):
    os.chdir(tmp_path)
    assert portmesh.default_key("web") == f"{tmp_path.name}/web"
    p = portmesh.port("web", pool=pool)
    assert portmesh.port("web", pool=pool) == p
    portmesh.release(key=f"{tmp_path.name}/web")


def test_a_held_port_lives_with_the_process_and_comes_back_when_it_is_killed(pool):
    # A process holds a port under a 2 s lease, renewed for as long as it runs.
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import portmesh, sys, time
            held = portmesh.hold('held', ttl=2, pool={pool!r}, key='proj/held')
            print(held.port, held.lease_id, flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    port, lease = (int(x) for x in proc.stdout.readline().split())
    assert in_pool(port)
    time.sleep(5)  # more than two TTLs: only the renewals keep it
    assert port in held_ports(), "kept alive past its TTL"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while port in held_ports():
        assert time.monotonic() < deadline, "the port never came back after the holder was killed"
        time.sleep(0.1)


def test_hold_as_a_context_manager_releases_at_the_end(pool):
    with portmesh.hold("ctx", ttl=5, pool=pool, key="proj/ctx") as held:
        assert held.alive()
        assert held.port in held_ports()
    assert not held.alive()
    deadline = time.monotonic() + 10
    while held.port in held_ports():
        assert time.monotonic() < deadline, "not released at the end of the block"
        time.sleep(0.05)


def test_register_discover_and_url_for(pool):
    p = portmesh.port("api", pool=pool, key="proj/api2")
    rid = portmesh.register("api2", p, tags=("v1",))
    found = portmesh.discover("api2")
    assert [(s.id, s.port, s.tags) for s in found] == [(rid, p, ("v1",))]
    assert portmesh.url_for("api2", "/items") == f"http://localhost:{p}/items"
    portmesh.deregister(rid)
    assert portmesh.discover("api2") == []
    with pytest.raises(portmesh.NotFound):
        portmesh.url_for("api2")
    portmesh.release(p)


def test_errors_are_exceptions_with_the_nodes_message_and_category(pool):
    with pytest.raises(portmesh.NotFound) as e:
        portmesh.port("x", pool="no-such-pool")
    assert e.value.kind == "not_found" and 'unknown pool "no-such-pool"' in str(e.value)
    taken = portmesh.port("t", pool=pool, key="proj/taken")
    with pytest.raises(portmesh.PortUnavailable) as e:
        portmesh.port("t2", pool=pool, want=taken, strategy="fail", key="proj/other")
    assert f"port {taken} is not available" in str(e.value)
    with pytest.raises(portmesh.InvalidArgument) as e:
        portmesh.port("bad\nname", pool=pool)
    assert e.value.kind == "invalid_argument"
    with pytest.raises(portmesh.NodeUnreachable):
        portmesh.port("x", node="127.0.0.1:1")
    portmesh.release(taken)


def test_stack_env_reads_what_up_and_run_set():
    env = portmesh.stack_env(
        {"PORTMESH_SERVICE": "web", "PORT": "8001", "PORT_ADMIN": "8002", "PORTMESH_LEASE": "7", "PORTMESH_PROJECT": "shop"}
    )
    assert (env.service, env.port, env.ports, env.lease_id, env.project) == ("web", 8001, {"admin": 8002}, 7, "shop")
    assert portmesh.stack_env({}).service is None


def held_ports():
    from portmesh import _cli

    return {int(a["port"]) for a in _cli.run(["ls"]).get("allocations", [])}


def test_two_processes_holding_the_same_service_never_share_a_port(pool, tmp_path):
    os.chdir(tmp_path)
    first = portmesh.hold("shared", ttl=5, pool=pool)
    code = f"import portmesh; h = portmesh.hold('shared', ttl=5, pool={pool!r}); print(h.port, h.key)"
    other = child(code)
    assert other.returncode == 0, other.stderr
    port, key = other.stdout.split()
    assert int(port) != first.port and key == f"{tmp_path.name}/shared#2"
    again = child(code)
    assert again.stdout.split()[0] == port, "the second slot is sticky too"
    first.release()
