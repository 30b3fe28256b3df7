"""What the Python package costs at start-up, against a warm local node, in alternating rounds.

    python python/bench/startup.py [--rounds 30]

Run with the interpreter of a venv the package is installed in (python/setup-tests.sh makes one).
Each round runs, in turn: `python -c pass`; `python -c "import portmesh; portmesh.port(...)"` (a
sticky key: the port is already held, as on every start but the first); the CLI's one-shot
`portmesh alloc` of the same key; and a Flask app factory without and with `PortMesh(app)`.
Prints medians (ms) and what the API and the extension add.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def timed(cmd, env):
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="portmesh-bench-")
    env = dict(os.environ, PORTMESH_HOME=home)
    env.pop("PORTMESH_NODE", None)
    py = sys.executable
    pm = os.path.join(os.path.dirname(py), "portmesh")
    subprocess.run([pm, "pools", "add", "bench", "31150-31199"], env=env, check=True, stdout=subprocess.DEVNULL)
    flask_plain = "from flask import Flask; app = Flask('b')"
    flask_pm = (
        "from flask import Flask; from portmesh.flask import PortMesh; app = Flask('b'); "
        "app.config.update(PORTMESH_POOL='bench', PORTMESH_KEY='bench/flask'); PortMesh(app)"
    )
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "import portmesh; port()": [py, "-c", "import portmesh; portmesh.port('web', pool='bench', key='bench/web')"],
        "portmesh alloc (CLI)": [pm, "alloc", "web", "--pool", "bench", "--key", "bench/web"],
        "Flask app": [py, "-c", flask_plain],
        "Flask app + PortMesh": [py, "-c", flask_pm],
    }
    for cmd in cases.values():  # warm: the node started, the port held, caches filled
        timed(cmd, env)
    got = {k: [] for k in cases}
    for r in range(args.rounds):
        order = list(cases.items())
        if r % 2:
            order.reverse()
        for name, cmd in order:
            got[name].append(timed(cmd, env))
    med = {k: statistics.median(v) for k, v in got.items()}
    for k, v in med.items():
        print(f"{k:<28} {v:8.2f} ms")
    api = med["import portmesh; port()"] - med["python -c pass"]
    cli = med["portmesh alloc (CLI)"]
    print(f"the API adds {api:.2f} ms to an interpreter's start; the CLI's one-shot alloc takes {cli:.2f} ms "
          f"(allowed: CLI + 5 ms = {cli + 5:.2f} ms)")
    print(f"the extension adds {med['Flask app + PortMesh'] - med['Flask app']:.2f} ms to a Flask app's start")
    subprocess.run([pm, "stop"], env=env, stdout=subprocess.DEVNULL)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
