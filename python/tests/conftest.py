"""A portmesh home of the tests' own (its local node started on demand by the first call, and
stopped at the end) and a pool of the tests' own, so no test depends on the ports this host's
programs use."""

import os
import shutil
import subprocess
import tempfile

import pytest

import portmesh
from portmesh import _cli

POOL = "pytest"
RANGE = "31100-31149"


@pytest.fixture(scope="session", autouse=True)
def home():
    path = tempfile.mkdtemp(prefix="portmesh-pytest-")
    saved = {k: os.environ.get(k) for k in ("PORTMESH_HOME", "PORTMESH_NODE", "PORTMESH_TEAM")}
    os.environ["PORTMESH_HOME"] = path
    os.environ.pop("PORTMESH_NODE", None)
    os.environ.pop("PORTMESH_TEAM", None)
    _cli.run(["pools", "add", POOL, RANGE])
    yield path
    subprocess.run([_cli.find_binary(), "stop"], capture_output=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pool():
    return POOL


def in_pool(p: int) -> bool:
    first, last = (int(x) for x in RANGE.split("-"))
    return first <= p <= last


__all__ = ["in_pool", "portmesh"]
