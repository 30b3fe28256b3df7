//! The wire boundary: bad requests, malformed bodies, reflection and health names.

use super::*;

/// Bad registry requests are refused with a message naming the field, and change nothing;
/// health reports that name gone services or repeat the status change nothing either.
#[tokio::test]
async fn bad_registry_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = pb::registry_client::RegistryClient::new(ch);
    let svc = client
        .register(pb::RegisterRequest {
            service: Some(pb::Service {
                name: "api".into(),
                ports: vec![pb::ServicePort { port: 18001, ..Default::default() }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let before = client.status().await.unwrap().revision;

    let e = raw.register(pb::RegisterRequest { service: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("service: say what to register"), "{e:?}");
    let report = |status: i32, n: usize| pb::ReportHealthRequest {
        reports: vec![
            pb::HealthReport { team: String::new(), id: svc.id.clone(), status, output: "x".into() };
            n
        ],
    };
    let e = raw.report_health(report(9, 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("unknown health status 9"), "{e:?}");
    let e = raw.report_health(report(pb::HealthStatus::Critical as i32, 4_097)).await.unwrap_err();
    assert!(e.message().contains("4097 reports, at most 4096"), "{e:?}");
    // The same status, or a service that is not registered: accepted, nothing changes.
    let same = raw.report_health(report(pb::HealthStatus::Passing as i32, 1)).await.unwrap().into_inner();
    assert_eq!((same.changed, same.revision), (0, before));
    let gone = pb::ReportHealthRequest {
        reports: vec![pb::HealthReport {
            id: "nobody".into(),
            status: pb::HealthStatus::Critical as i32,
            ..Default::default()
        }],
    };
    assert_eq!(raw.report_health(gone).await.unwrap().into_inner().changed, 0);

    assert_eq!(client.status().await.unwrap().revision, before, "nothing was written");
    let found = client.discover(pb::DiscoverRequest::default()).await.unwrap().services;
    assert_eq!((found.len(), found[0].status()), (1, pb::HealthStatus::Passing));
}

/// Sends raw bytes as the body of a unary call, whatever the method expects.
#[derive(Debug, Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// A raw gRPC client of `node` and `path` (e.g. `/portmesh.v1.Allocator/Allocate`), for bodies
/// and methods no typed client would send.
async fn raw_call(
    node: &RunningNode,
    path: &'static str,
) -> (tonic::client::Grpc<tonic::transport::Channel>, tonic::codegen::http::uri::PathAndQuery) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    (grpc, tonic::codegen::http::uri::PathAndQuery::from_static(path))
}

/// Issue 15: two request messages on a one-message call are refused before anything is applied
/// (tonic alone applied the first and dropped the second).
#[tokio::test]
async fn two_messages_on_a_one_message_call_are_refused_and_change_nothing() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let before = client.status().await.unwrap().revision;
    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Allocator/Allocate").await;
    let one =
        pb::AllocateRequest { items: vec![item("twice", "default")], ..Default::default() }.encode_to_vec();
    let two = tokio_stream::iter(vec![one.clone(), one]);
    let status = grpc.client_streaming(tonic::Request::new(two), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("takes one request message"), "{status:?}");
    assert_eq!(client.status().await.unwrap().revision, before, "nothing was applied");
    assert!(client.list(pb::ListRequest::default()).await.unwrap().allocations.is_empty());
}

/// A body that is not the method's protobuf message is the caller's mistake: INVALID_ARGUMENT
/// with the `invalid_argument` category (tonic alone says INTERNAL), and nothing changes.
#[tokio::test]
async fn a_malformed_protobuf_body_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let before = client.status().await.unwrap().revision;
    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Allocator/Allocate").await;
    let status = grpc.unary(tonic::Request::new(vec![0xff, 0xff, 0xff]), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let category = status.metadata().get("portmesh-error").and_then(|v| v.to_str().ok());
    assert_eq!(category, Some("invalid_argument"), "{status:?}");
    assert_eq!(client.status().await.unwrap().revision, before, "a malformed request changed the state");
}

/// The hand-written `Watch` service refuses what the generated ones refuse: a method it does not
/// have is UNIMPLEMENTED naming the path, and a body that is not a `WatchRequest` is
/// INVALID_ARGUMENT with its category; neither opens a stream.
#[tokio::test]
async fn the_watch_service_refuses_unknown_methods_and_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _client) = node_in(dir.path(), |_| {}).await;
    let streams = || node.api.metrics().watch_streams.get();

    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Watch/Subscribe").await;
    let status = grpc.unary(tonic::Request::new(Vec::new()), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("/portmesh.v1.Watch/Subscribe"), "{status:?}");

    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Watch/Watch").await;
    let status =
        grpc.server_streaming(tonic::Request::new(vec![0xff, 0xff, 0xff]), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let category = status.metadata().get("portmesh-error").and_then(|v| v.to_str().ok());
    assert_eq!(category, Some("invalid_argument"), "{status:?}");
    assert_eq!(streams(), 0, "a refused watch left a stream open");
}

/// Stock gRPC tools can talk to a node: reflection answers in v1alpha too (grpcurl before 1.9,
/// Python's grpcio-reflection), and gRPC health knows the node and each service by name, so a
/// readiness probe naming one is answered (and an unknown name is NOT_FOUND).
#[tokio::test]
async fn reflection_v1alpha_and_named_health_services_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let (node, _client) = node_in(dir.path(), |_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let mut resp = refl.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();

    let mut health = HealthClient::new(channel);
    for name in portmesh_node::HEALTH_NAMES {
        assert!(
            *name == "portmesh" || listed.contains(*name),
            "{name} is no service of the node: {listed:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r =
                health.check(HealthCheckRequest { service: name.to_string() }).await.unwrap().into_inner();
            if r.status() == ServingStatus::Serving {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} never SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.Nothing".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}
