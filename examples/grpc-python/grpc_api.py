"""The portmesh gRPC API spoken directly, with stubs generated from the proto: allocate under a
lease, keep it alive on one stream, watch changes. What a program in any language with gRPC does
(Python programs use the `portmesh` package instead: docs/python.md).

Stubs are generated from proto/portmesh/v1/portmesh.proto by setup.sh (grpcio-tools); the
comments in that file are the API reference. This client follows the leader the way the protocol
asks (docs/api.md): a follower answers UNAVAILABLE with the leader's address in the
`portmesh-leader` metadata, and the call is sent there again.
"""

import os
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.join(sys.prefix, "portmesh-stubs"))
from portmesh.v1 import portmesh_pb2 as pb  # noqa: E402
from portmesh.v1 import portmesh_pb2_grpc as rpc  # noqa: E402


class PortmeshError(Exception):
    """A call the node refused; `kind` is the `portmesh-error` category."""

    def __init__(self, err):
        meta = dict(err.trailing_metadata() or ())
        self.kind = meta.get("portmesh-error")
        self.leader = meta.get("portmesh-leader")
        super().__init__(f"{err.code().name}: {err.details()}")


class Client:
    def __init__(self, addr, team="default"):
        self.team = team
        self._connect(addr)

    def _connect(self, addr):
        self.addr = addr
        self.channel = grpc.insecure_channel(addr)
        self.allocator = rpc.AllocatorStub(self.channel)
        self.leases = rpc.LeasesStub(self.channel)
        self.watcher = rpc.WatchStub(self.channel)

    def _call(self, method_name, stub_name, request):
        for _ in range(20):
            try:
                return getattr(getattr(self, stub_name), method_name)(request, timeout=15)
            except grpc.RpcError as err:
                e = PortmeshError(err)
                if e.kind == "not_leader" and e.leader and e.leader != self.addr:
                    self._connect(e.leader)
                    continue
                if e.kind == "not_leader":
                    time.sleep(0.1)
                    continue
                raise e from None
        raise RuntimeError("no leader answered")

    def allocate(self, services, pool="default", ttl_s=None, lease_id=0):
        """Ports for `services` (one each), in one atomic batch, optionally under a new lease."""
        items = [pb.AllocItem(service=s, pool=pool) for s in services]
        req = pb.AllocateRequest(team=self.team, items=items, lease_id=lease_id,
                                 ttl_ms=int(ttl_s * 1000) if ttl_s else 0)
        return self._call("Allocate", "allocator", req)

    def revoke(self, lease_id):
        return self._call("Revoke", "leases", pb.LeaseRevokeRequest(team=self.team, lease_id=lease_id))

    def keep_alive(self, lease_id, ttl_s, on_lost=None):
        """Renews `lease_id` every ttl/3 on one KeepAlive stream, in a thread; returns a stop event."""
        stop = threading.Event()

        def requests():
            while not stop.is_set():
                yield pb.LeaseKeepAliveRequest(team=self.team, lease_id=lease_id)
                stop.wait(ttl_s / 3)

        def run():
            try:
                for reply in self.leases.KeepAlive(requests()):
                    if reply.ttl_ms == 0:
                        if on_lost:
                            on_lost(lease_id)
                        return
            except grpc.RpcError:
                if on_lost and not stop.is_set():
                    on_lost(lease_id)

        threading.Thread(target=run, daemon=True).start()
        return stop

    def watch(self, from_revision=0, **filters):
        """Yields (revision, events) messages from `from_revision` on."""
        req = pb.WatchRequest(from_revision=from_revision, **filters)
        for msg in self.watcher.Watch(req):
            yield msg.revision, list(msg.events)


def event_name(event):
    return pb.EventType.Name(event.type)
