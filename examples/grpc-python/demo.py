"""Allocate two ports under a lease, keep it alive past its TTL, watch the changes, give them back.

    python demo.py --node HOST:PORT [--ttl SECONDS]

Prints one JSON object per step, so a test (or a CI script) can read it.
"""

import argparse
import json
import time

from grpc_api import Client, event_name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", required=True)
    ap.add_argument("--ttl", type=float, default=2.0)
    a = ap.parse_args()
    c = Client(a.node)
    start = next(c.watch(progress_interval_ms=100))[0]  # the revision now (a progress notification)
    r = c.allocate(["py-api", "py-worker"], ttl_s=a.ttl)
    ports = [x.port for x in r.allocations]
    print(json.dumps({"step": "allocated", "ports": ports, "lease_id": r.lease_id, "revision": r.revision}), flush=True)
    lost = []
    stop = c.keep_alive(r.lease_id, a.ttl, on_lost=lost.append)
    time.sleep(a.ttl * 2.5)  # outlive the TTL: only the renewals keep the ports
    print(json.dumps({"step": "kept", "lost": lost}), flush=True)
    stop.set()
    c.revoke(r.lease_id)
    seen = []
    for _, events in c.watch(from_revision=start + 1):
        seen += [(event_name(e), e.allocation.port) for e in events if e.allocation.port]
        if sum(1 for kind, _ in seen if kind == "RELEASED") >= 2:
            break
    print(json.dumps({"step": "watched", "events": seen}), flush=True)


if __name__ == "__main__":
    main()
