//! A hand-held mesh client for the security tests: it takes the credentials
//! found in a data directory (node key, cluster secret, certificate) and
//! tries each plane of a running node directly, the way an attacker holding
//! those files would: join gossip, open a data-plane stream, send a Raft
//! message, call the Admin API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use llmesh_mesh::pki::Trust;
use llmesh_mesh::pki::grpc::ChannelOptions;
use llmesh_mesh::{
    ApiKind, ClusterSecret, DataPlane, DataPlaneConfig, InferenceRequest, InferenceResponse, LivenessConfig,
    MembershipConfig, MeshView, NodeState, PeerSnapshot, RequestHandler, ServeError,
};
use llmesh_proto::{RaftBatch, StatusRequest};
use tokio_util::sync::CancellationToken;

/// Whatever credentials a data directory holds.
pub struct Credentials {
    /// Certificates (and the node key).
    pub trust: Arc<Trust>,
    /// The cluster secret (pnet key).
    pub secret: ClusterSecret,
    keypair: llmesh_mesh::identity::Keypair,
    join_key: Option<[u8; 32]>,
}

/// Loads the node key, cluster secret and certificate kept in `dir`.
pub fn credentials(dir: &Path) -> Credentials {
    let keypair = llmesh_mesh::identity::load_existing(dir).expect("node key readable").expect("a node key");
    let secret = ClusterSecret::load(dir).expect("secret readable").expect("a cluster secret");
    let trust = Trust::load(dir, keypair.clone(), None).expect("certificates load");
    assert!(trust.is_enrolled(), "{} holds no certificate", dir.display());
    Credentials { trust, secret, keypair, join_key: None }
}

/// A new node with the join `token` in `dir` (its key created there unless
/// present), not yet enrolled: gossip asks the cluster for its certificate.
pub fn join(dir: &Path, token: &str) -> Credentials {
    let token = llmesh_mesh::JoinToken::decode(token).expect("token");
    token.secret.store(dir).expect("stores the secret");
    let (keypair, _) = llmesh_mesh::identity::load_or_create(dir).expect("node key");
    let trust = Trust::load(dir, keypair.clone(), Some(token.ca)).expect("certificates load");
    Credentials { trust, secret: token.secret, keypair, join_key: Some(token.join) }
}

/// A node as another node's `/mesh/v1/nodes` lists it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Node id.
    pub id: String,
    /// QUIC data-plane address.
    pub data: SocketAddr,
    /// gRPC control address.
    pub control: SocketAddr,
    /// libp2p address with its `/p2p/` id.
    pub p2p: String,
}

/// Refuses everything: the probe only calls out.
struct Nothing;

#[async_trait::async_trait]
impl RequestHandler for Nothing {
    async fn serve(&self, _req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
        Err(ServeError::BackendUnavailable("probe".into()))
    }
}

/// Opens a data-plane stream to `target` with `creds` and asks it for a
/// chat completion of `model`; `Ok(status)` when the target answered.
pub async fn data_stream(creds: &Credentials, target: &Target, model: &str) -> Result<u16, ServeError> {
    let config = DataPlaneConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        node_name: "probe".into(),
        connect_timeout: Duration::from_secs(3),
        head_timeout: Duration::from_secs(10),
        max_body_bytes: 1 << 20,
    };
    let stop = CancellationToken::new();
    let plane = DataPlane::bind(config, creds.trust.clone(), Arc::new(Nothing), stop.clone()).expect("binds");
    let view = MeshView {
        peers: vec![PeerSnapshot {
            state: NodeState { node_id: target.id.clone(), data_addr: target.data.to_string(), ..NodeState::default() },
            liveness: llmesh_mesh::Liveness::Alive,
            last_seen_ago: Duration::ZERO,
        }],
        ..MeshView::default()
    };
    plane.update_peers(&view);
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"probe"}}]}}"#);
    let request = InferenceRequest {
        request_id: "probe".into(),
        api: ApiKind::OpenaiChat,
        meta: llmesh_mesh::RequestMeta { model: model.into(), ..Default::default() },
        body: Bytes::from(body),
        deadline: None,
        queue_until: None,
        forwarded_by: None,
        on_slot: None,
        traceparent: String::new(),
    };
    let result = plane.forward(&target.id, &request).await.map(|f| f.response.status);
    stop.cancel();
    plane.close().await;
    result
}

fn channel(creds: &Credentials, target: &Target) -> tonic::transport::Channel {
    let options = ChannelOptions { connect_timeout: Duration::from_secs(3), timeout: Duration::from_secs(5) };
    llmesh_mesh::pki::grpc::channel(target.control, &creds.trust, options).expect("channel")
}

/// Sends an (empty) batch of Raft messages to `target`, presenting the
/// cluster tag derived from `creds`' secret.
pub async fn raft_send(creds: &Credentials, target: &Target) -> Result<(), tonic::Status> {
    raft_over(channel(creds, target), creds).await
}

/// Calls Admin.Status on `target` with `creds` and the admin token.
pub async fn admin_status(creds: &Credentials, target: &Target, admin_token: &str) -> Result<(), tonic::Status> {
    admin_over(channel(creds, target), admin_token).await
}

async fn raft_over(channel: tonic::transport::Channel, creds: &Credentials) -> Result<(), tonic::Status> {
    let from = llmesh_mesh::coordinator::raft_id(&creds.trust.node_id().to_string());
    let mut request = tonic::Request::new(RaftBatch { from, messages: Vec::new() });
    let tag = llmesh_mesh::coordinator::cluster_tag(&creds.secret);
    request.metadata_mut().insert(
        llmesh_mesh::coordinator::transport::CLUSTER_HEADER,
        tag.parse().map_err(|_| tonic::Status::internal("tag"))?,
    );
    llmesh_proto::raft_client::RaftClient::new(channel).send(request).await.map(|_| ())
}

async fn admin_over(channel: tonic::transport::Channel, admin_token: &str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(StatusRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin_token}").parse().map_err(|_| tonic::Status::internal("token"))?,
    );
    llmesh_proto::admin_client::AdminClient::new(channel).status(request).await.map(|_| ())
}

/// Joins the mesh at `target`'s libp2p address with `creds` for `watch`,
/// and returns the node ids this probe saw in gossip.
pub async fn gossip(creds: &Credentials, target: &Target, watch: Duration) -> Vec<String> {
    let config = MembershipConfig {
        keypair: creds.keypair.clone(),
        secret: creds.secret.clone(),
        trust: creds.trust.clone(),
        join_key: creds.join_key,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap: vec![target.p2p.parse().expect("p2p addr")],
        mdns: false,
        heartbeat: Duration::from_millis(500),
        liveness: LivenessConfig::default(),
    };
    let stop = CancellationToken::new();
    let (membership, task) = llmesh_mesh::membership::start(config, stop.clone()).await.expect("membership starts");
    membership.set_local_state(NodeState { name: "probe".into(), ..NodeState::default() });
    tokio::time::sleep(watch).await;
    let seen = membership.view().peers.iter().map(|p| p.state.node_id.clone()).collect();
    stop.cancel();
    let _ = task.await;
    seen
}

/// An attacker's TLS client: presents `creds`' certificate and accepts any
/// server, so a refusal can only come from the server side.
fn reckless_client(creds: &Credentials, alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = creds.trust.cert().expect("a certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(creds.trust.private_key());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(vec![cert], key)
        .expect("client cert");
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Like [`data_stream`], but trusting any server: opens a QUIC connection
/// and a stream to `target`, sends a request head, and returns the status
/// of the answer if the server let the stream through.
pub async fn data_stream_reckless(creds: &Credentials, target: &Target, model: &str) -> Result<u32, String> {
    use futures::{SinkExt, StreamExt};
    use llmesh_proto::frame::{Frame, FrameCodec};
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(reckless_client(creds, llmesh_mesh::dataplane::ALPN))
            .map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let attempt = async {
        let conn =
            endpoint.connect(target.data, "llmesh").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut writer = tokio_util::codec::FramedWrite::new(send, FrameCodec::default());
        let head = llmesh_proto::RequestHead {
            protocol_version: llmesh_proto::PROTOCOL_VERSION,
            request_id: "reckless".into(),
            api: ApiKind::OpenaiChat as i32,
            model: model.into(),
            ..Default::default()
        };
        writer.send(Frame::RequestHead(head)).await.map_err(|e| e.to_string())?;
        let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"probe"}}]}}"#);
        writer.send(Frame::Body(Bytes::from(body))).await.map_err(|e| e.to_string())?;
        writer.get_mut().finish().map_err(|e| e.to_string())?;
        let mut reader = tokio_util::codec::FramedRead::new(recv, FrameCodec::default());
        match reader.next().await {
            Some(Ok(Frame::ResponseHead(head))) => Ok(head.status),
            other => Err(format!("no response head: {other:?}")),
        }
    };
    let result =
        tokio::time::timeout(Duration::from_secs(10), attempt).await.unwrap_or_else(|_| Err("timed out".into()));
    endpoint.close(0u32.into(), b"done");
    result
}

/// A gRPC channel to `target`'s control port that trusts any server.
fn reckless_channel(creds: &Credentials, target: &Target) -> tonic::transport::Channel {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(reckless_client(creds, b"h2")));
    let addr = target.control;
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("llmesh").expect("name");
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connect)
}

/// [`raft_send`] and [`admin_status`] with a client that trusts any server.
pub async fn control_reckless(
    creds: &Credentials,
    target: &Target,
    admin_token: &str,
) -> (Result<(), tonic::Status>, Result<(), tonic::Status>) {
    let channel = reckless_channel(creds, target);
    (raft_over(channel.clone(), creds).await, admin_over(channel, admin_token).await)
}
