"""What stock gRPC tooling sees of a portmesh node, with no portmesh stubs at all.

Kubernetes-style probes through the standard health client (grpcio-health-checking), and the
schema through server reflection as grpcio-reflection's client speaks it (grpc.reflection.v1alpha
only, like grpcurl before 1.9 and several GUI clients).

    python stock_tools.py --node HOST:PORT

Prints one JSON object: the health of "" (liveness), "portmesh" (readiness) and an unknown name,
the services reflection lists, and the methods it resolves for portmesh.v1.Allocator.
"""
import argparse
import json

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as e:
        return e.code().name


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", required=True)
    args = parser.parse_args()
    with grpc.insecure_channel(args.node) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(db.get_services())
        allocator = DescriptorPool(db).FindServiceByName("portmesh.v1.Allocator")
        print(
            json.dumps(
                {
                    "health": {name: health(channel, name) for name in ["", "portmesh", "no.such.Service"]},
                    "services": services,
                    "allocator_methods": sorted(m.name for m in allocator.methods),
                }
            )
        )


if __name__ == "__main__":
    main()
