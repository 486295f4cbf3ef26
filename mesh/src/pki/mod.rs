//! The cluster's certificates: who is a member, provably.
//!
//! `llmesh init` (or the first agent started without `--join`) creates a
//! cluster CA: an Ed25519 key (`ca.key`, owner-only) and a self-signed
//! certificate (`ca.crt`) whose SHA-256 the join token carries. Every node's
//! certificate is issued by that CA **for the node's own libp2p key**, so the
//! key in a certificate *is* the node id: no name to parse or trust, and the
//! TLS handshake proves possession.
//!
//! A joining node gets its certificate by asking, over the libp2p private
//! network (which already proved it holds the cluster secret, and whose noise
//! handshake proved its node id), a node that holds the CA key: the seed.
//! It checks the CA it is sent against the fingerprint in its token, then
//! keeps `node.crt` beside its key; restarts need no issuer.
//!
//! Revocation is a Raft command; every node feeds the replicated set of
//! revoked node ids into its [`Trust`], which every plane consults on every
//! handshake, gossip message, stream and call — so an old certificate of a
//! revoked node is worth nothing anywhere.

pub mod grpc;
pub mod tls;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::{self, Keypair};
use llmesh_proto::{NodeState, SignedNodeState};
use prost::Message as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::sync::watch;

use crate::store::{read_private, write_private};

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
const NODE_CERT_FILE: &str = "node.crt";
/// Written when the cluster revokes this node; holds when.
const REVOKED_MARKER_FILE: &str = "revoked";
const CA_NAME: &str = "llmesh cluster CA";
/// How long a verified member certificate is taken on trust before its
/// chain (and expiry) is checked again.
const VERIFIED_FOR: Duration = Duration::from_secs(60);
/// The most certificates remembered as verified (a mesh's members).
const VERIFIED_MAX: usize = 4096;
/// Domain separation for state signatures: a signature made for gossip can
/// never be replayed as anything else signed by the node key.
const STATE_SIGNING_CONTEXT: &[u8] = b"llmesh-node-state-v1:";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// DER prefix of an Ed25519 PKCS#8 v1 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// Why a node is not a working member of its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberProblem {
    /// No peer reachable to enroll through; says what was tried.
    NoPeers(String),
    /// The cluster refused this node's join token; says why.
    TokenRefused(String),
    /// The cluster revoked this node; says when.
    Revoked(String),
}

impl MemberProblem {
    /// A short code for readiness checks: `no_peers`, `token_refused`,
    /// `revoked`.
    pub fn code(&self) -> &'static str {
        match self {
            MemberProblem::NoPeers(_) => "no_peers",
            MemberProblem::TokenRefused(_) => "token_refused",
            MemberProblem::Revoked(_) => "revoked",
        }
    }

    /// What an operator should read.
    pub fn detail(&self) -> String {
        match self {
            MemberProblem::NoPeers(what) => what.clone(),
            MemberProblem::TokenRefused(why) => why.clone(),
            MemberProblem::Revoked(when) => format!("this node was revoked by the cluster at {when}"),
        }
    }
}

fn read_revoked_marker(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(REVOKED_MARKER_FILE)).ok()?;
    Some(text.trim().to_string())
}

/// SHA-256 of a certificate.
pub type Fingerprint = [u8; 32];

/// What can go wrong with the cluster's certificates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing the data directory failed.
    #[error("{path}: {message}")]
    Io {
        /// File involved.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// A stored or received certificate or key is not usable.
    #[error("{0}")]
    Invalid(String),
    /// This node has no certificate yet.
    #[error("this node has no cluster certificate yet (enrollment pending)")]
    NotEnrolled,
    /// The CA offered is not the one the join token names.
    #[error("the cluster CA offered ({offered}) is not the one in the join token ({expected})")]
    WrongCa {
        /// Fingerprint in the token.
        expected: String,
        /// Fingerprint offered.
        offered: String,
    },
    /// The certificate does not chain to the cluster CA.
    #[error("certificate not issued by this cluster's CA: {0}")]
    Untrusted(String),
    /// The node was revoked by an operator.
    #[error("node {0} is revoked")]
    Revoked(String),
    /// This node holds no CA key and cannot issue certificates.
    #[error("this node does not hold the cluster CA key")]
    NotIssuer,
    /// The requester did not prove it holds the current join key.
    #[error("the join token is not (or no longer) valid: ask an operator for a current one (`llmesh token rotate`)")]
    BadJoinProof,
    /// The issuer does not know the join key yet (still starting).
    #[error("the issuer is still starting; retry")]
    NotReady,
    /// The signed state does not hold together.
    #[error("{0}")]
    BadState(String),
    /// A state without a certificate from a node whose certificate this
    /// node does not hold yet: fetch it, then open the state again.
    #[error("no certificate known for node {0}")]
    CertUnknown(PeerId),
}

fn io_error(path: &Path, err: &std::io::Error) -> PkiError {
    PkiError::Io { path: path.display().to_string(), message: err.to_string() }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hex of a fingerprint.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    params
}

fn rcgen_error(err: rcgen::Error) -> PkiError {
    PkiError::Invalid(format!("certificate generation: {err}"))
}

/// Creates the cluster CA in `data_dir` unless one is there; returns its
/// fingerprint (for the join token).
pub fn create_ca(data_dir: &Path) -> Result<Fingerprint, PkiError> {
    if let Some(existing) = ca_fingerprint(data_dir)? {
        return Ok(existing);
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(rcgen_error)?;
    let cert = ca_params().self_signed(&key).map_err(rcgen_error)?;
    let key_path = data_dir.join(CA_KEY_FILE);
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| io_error(&key_path, &e))?;
    let cert_path = data_dir.join(CA_CERT_FILE);
    write_private(&cert_path, cert.pem().as_bytes()).map_err(|e| io_error(&cert_path, &e))?;
    Ok(fingerprint(cert.der()))
}

/// The fingerprint of the CA certificate stored in `data_dir`, if any.
pub fn ca_fingerprint(data_dir: &Path) -> Result<Option<Fingerprint>, PkiError> {
    Ok(read_cert(&data_dir.join(CA_CERT_FILE))?.map(|der| fingerprint(&der)))
}

fn read_cert(path: &Path) -> Result<Option<CertificateDer<'static>>, PkiError> {
    use rustls::pki_types::pem::PemObject as _;
    let Some(bytes) = read_private(path).map_err(|e| io_error(path, &e))? else { return Ok(None) };
    CertificateDer::from_pem_slice(&bytes)
        .map(Some)
        .map_err(|e| PkiError::Invalid(format!("{} is not a PEM certificate: {e}", path.display())))
}

fn write_cert(path: &Path, der: &[u8]) -> Result<(), PkiError> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    write_private(path, pem.as_bytes()).map_err(|e| io_error(path, &e))
}

/// The Ed25519 public key a certificate carries.
fn ed25519_key_of(cert: &CertificateDer<'_>) -> Result<identity::PublicKey, PkiError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let spki = parsed.subject_public_key_info();
    let raw = spki
        .as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or_else(|| PkiError::Invalid("certificate key is not Ed25519".into()))?;
    let key = identity::ed25519::PublicKey::try_from_bytes(raw)
        .map_err(|e| PkiError::Invalid(format!("certificate key: {e}")))?;
    Ok(identity::PublicKey::from(key))
}

/// The node a certificate belongs to: the peer id of the key it carries.
/// Says nothing about whether it is trusted; see [`Trust::verify_member`].
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<PeerId, PkiError> {
    Ok(ed25519_key_of(cert)?.to_peer_id())
}

/// The Ed25519 public key behind a peer id (peer ids of Ed25519 keys embed
/// the key itself).
fn ed25519_key_of_peer(peer: &PeerId) -> Result<identity::ed25519::PublicKey, PkiError> {
    let multihash = peer.as_ref();
    // 0x00 is the identity multihash: the digest is the key itself.
    if multihash.code() != 0 {
        return Err(PkiError::Invalid(format!("peer id {peer} does not embed its key")));
    }
    identity::PublicKey::try_decode_protobuf(multihash.digest())
        .ok()
        .and_then(|key| key.try_into_ed25519().ok())
        .ok_or_else(|| PkiError::Invalid(format!("peer id {peer} is not an Ed25519 key")))
}

/// What a join proof is an HMAC of: the requester's own node id.
fn proof_message(node: &PeerId) -> Vec<u8> {
    let mut message = b"llmesh-enroll-v1:".to_vec();
    message.extend_from_slice(&node.to_bytes());
    message
}

/// Raw 32-byte Ed25519 public key, as rcgen wants a subject key.
struct SubjectKey([u8; 32]);

impl rcgen::PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// The node's libp2p key as PKCS#8, the form TLS stacks load.
fn pkcs8_of(keypair: &Keypair) -> Result<PrivatePkcs8KeyDer<'static>, PkiError> {
    let ed = keypair.clone().try_into_ed25519().map_err(|_| PkiError::Invalid("node key is not Ed25519".into()))?;
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(ed.secret().as_ref());
    Ok(PrivatePkcs8KeyDer::from(der))
}

/// The CA as a verifier needs it.
struct Anchor {
    der: CertificateDer<'static>,
    anchor: rustls::pki_types::TrustAnchor<'static>,
}

impl Anchor {
    fn new(der: CertificateDer<'static>) -> Result<Anchor, PkiError> {
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| PkiError::Invalid(format!("the cluster CA certificate is unusable: {e}")))?
            .to_owned();
        Ok(Anchor { der, anchor })
    }
}

/// Which side of a TLS handshake a certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A server (QUIC listener, gRPC server).
    Server,
    /// A client, or a gossip author.
    Client,
}

/// Everything this node knows about cluster membership proofs: its key and
/// certificate, the CA, the issuing key where it holds it, and the revoked
/// set. Shared by every plane.
pub struct Trust {
    keypair: Keypair,
    node_id: PeerId,
    pkcs8: PrivatePkcs8KeyDer<'static>,
    data_dir: PathBuf,
    expected_ca: Option<Fingerprint>,
    ca: OnceLock<Anchor>,
    cert: OnceLock<CertificateDer<'static>>,
    /// The CA key, where this node holds it (the seed, or a voter that
    /// opened the copy sealed in the cluster state).
    issuer: std::sync::RwLock<Option<Arc<rcgen::KeyPair>>>,
    /// Why this node is not a working member, when it is not.
    problem: watch::Sender<Option<MemberProblem>>,
    /// The join key requesters must prove, as the cluster state says.
    join_key: std::sync::RwLock<Option<[u8; 32]>>,
    revoked: watch::Sender<Arc<BTreeSet<String>>>,
    enrolled: watch::Sender<bool>,
    provider: Arc<CryptoProvider>,
    /// Member certificates that verified lately, by fingerprint: every
    /// gossiped state carries its author's, and checking the chain each
    /// time cost a busy 100-node mesh more CPU than anything else.
    verified: std::sync::Mutex<HashMap<Fingerprint, (PeerId, Instant)>>,
    /// The latest certificate each member's states came with: states on
    /// gossip travel without one once the mesh has seen it.
    members: std::sync::Mutex<HashMap<PeerId, Arc<[u8]>>>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("node_id", &self.node_id)
            .field("enrolled", &self.is_enrolled())
            .field("issuer", &self.can_issue())
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// Loads what `data_dir` holds for `keypair`. `expected_ca` is the CA
    /// fingerprint from a join token, when joining. A node holding the CA
    /// key issues its own certificate at once.
    pub fn load(data_dir: &Path, keypair: Keypair, expected_ca: Option<Fingerprint>) -> Result<Arc<Trust>, PkiError> {
        let node_id = keypair.public().to_peer_id();
        let pkcs8 = pkcs8_of(&keypair)?;
        let ca_der = read_cert(&data_dir.join(CA_CERT_FILE))?;
        if let (Some(expected), Some(der)) = (expected_ca, &ca_der)
            && fingerprint(der) != expected
        {
            return Err(PkiError::WrongCa { expected: hex(&expected), offered: hex(&fingerprint(der)) });
        }
        let key_path = data_dir.join(CA_KEY_FILE);
        let issuer = match read_private(&key_path).map_err(|e| io_error(&key_path, &e))? {
            Some(pem) => {
                let text = String::from_utf8_lossy(&pem);
                Some(
                    rcgen::KeyPair::from_pem(&text)
                        .map_err(|e| PkiError::Invalid(format!("{} is not a CA key: {e}", key_path.display())))?,
                )
            }
            None => None,
        };
        let trust = Arc::new(Trust {
            keypair,
            node_id,
            pkcs8,
            data_dir: data_dir.to_path_buf(),
            expected_ca,
            ca: OnceLock::new(),
            cert: OnceLock::new(),
            issuer: std::sync::RwLock::new(issuer.map(Arc::new)),
            problem: watch::Sender::new(read_revoked_marker(data_dir).map(MemberProblem::Revoked)),
            join_key: std::sync::RwLock::new(None),
            revoked: watch::Sender::new(Arc::default()),
            enrolled: watch::Sender::new(false),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            verified: std::sync::Mutex::default(),
            members: std::sync::Mutex::default(),
        });
        let Some(ca_der) = ca_der else {
            if trust.can_issue() {
                return Err(PkiError::Invalid(format!("{} is missing beside ca.key", CA_CERT_FILE)));
            }
            return Ok(trust);
        };
        // OnceLock::set only fails when already set, which cannot be here.
        let _ = trust.ca.set(Anchor::new(ca_der)?);
        match read_cert(&data_dir.join(NODE_CERT_FILE))? {
            // The issuer certifies itself.
            None if trust.can_issue() => {
                let (ca, cert) = trust.sign_for(&trust.node_id)?;
                trust.accept_enrollment(&ca, &cert)?;
            }
            None => {}
            Some(cert) => match trust.check_own(&cert) {
                Ok(()) => {
                    let _ = trust.cert.set(cert);
                    trust.enrolled.send_replace(true);
                }
                // A certificate for another key or CA: enroll again rather
                // than refuse to start.
                Err(err) => tracing::warn!(error = %err, "ignoring the stored node certificate; enrolling again"),
            },
        }
        Ok(trust)
    }

    /// This node's id.
    pub fn node_id(&self) -> PeerId {
        self.node_id
    }

    /// Whether this node has its certificate.
    pub fn is_enrolled(&self) -> bool {
        self.cert.get().is_some()
    }

    /// Waits until this node has its certificate.
    pub async fn enrolled(&self) {
        let mut rx = self.enrolled.subscribe();
        // Only fails when the sender is gone, which it is not while self lives.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Whether this node holds the CA key.
    pub fn can_issue(&self) -> bool {
        self.issuer().is_some()
    }

    fn issuer(&self) -> Option<Arc<rcgen::KeyPair>> {
        self.issuer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The CA key in PEM, where this node holds it (to share it, sealed,
    /// through the cluster state).
    pub fn ca_key_pem(&self) -> Option<String> {
        self.issuer().map(|k| k.serialize_pem())
    }

    /// Takes in the CA key (PEM) shared through the cluster state: checks
    /// that it belongs to the cluster CA, keeps it in `ca.key` and issues
    /// certificates from now on. `Ok(false)` when it held it already.
    pub fn install_ca_key(&self, pem: &str) -> Result<bool, PkiError> {
        if self.can_issue() {
            return Ok(false);
        }
        let key = rcgen::KeyPair::from_pem(pem).map_err(|e| PkiError::Invalid(format!("not a CA key: {e}")))?;
        let anchor = self.ca.get().ok_or(PkiError::NotEnrolled)?;
        let ca_public = ed25519_key_of(&anchor.der)?;
        let matches = ca_public.try_into_ed25519().is_ok_and(|k| k.to_bytes()[..] == key.public_key_raw()[..]);
        if !matches {
            return Err(PkiError::Invalid("the shared CA key does not belong to this cluster's CA".into()));
        }
        let path = self.data_dir.join(CA_KEY_FILE);
        if !path.exists() {
            write_private(&path, pem.as_bytes()).map_err(|e| io_error(&path, &e))?;
        }
        *self.issuer.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(key));
        Ok(true)
    }

    /// Why this node is not a working member, if it is not.
    pub fn problem(&self) -> Option<MemberProblem> {
        self.problem.borrow().clone()
    }

    /// Records why this node is not a working member (`None`: it is).
    /// A revocation is final: nothing replaces it.
    pub fn set_problem(&self, problem: Option<MemberProblem>) {
        self.problem.send_if_modified(|current| {
            if matches!(current, Some(MemberProblem::Revoked(_))) || *current == problem {
                return false;
            }
            *current = problem;
            true
        });
    }

    /// Notes that the cluster revoked this node: logs it once, keeps a
    /// marker in the data directory (so a restart stays out) and reports
    /// it from now on.
    pub fn revoke_self(&self, when: &str) {
        if matches!(self.problem(), Some(MemberProblem::Revoked(_))) {
            return;
        }
        let path = self.data_dir.join(REVOKED_MARKER_FILE);
        if let Err(err) = std::fs::write(&path, format!("{when}\n")) {
            tracing::warn!(path = %path.display(), error = %err, "cannot record the revocation");
        }
        tracing::error!(
            "this node was revoked by the cluster at {when}: it takes no part in the mesh and serves no requests for it; remove it, or delete {} and join again with a current token",
            self.data_dir.display()
        );
        self.problem.send_replace(Some(MemberProblem::Revoked(when.to_string())));
    }

    /// Waits until [`Trust::problem`] changes.
    pub fn watch_problem(&self) -> watch::Receiver<Option<MemberProblem>> {
        self.problem.subscribe()
    }

    /// The CA certificate, once known.
    pub fn ca_cert(&self) -> Option<CertificateDer<'static>> {
        self.ca.get().map(|a| a.der.clone())
    }

    /// This node's certificate, once enrolled.
    pub fn cert(&self) -> Option<CertificateDer<'static>> {
        self.cert.get().cloned()
    }

    /// This node's private key (PKCS#8), for TLS stacks.
    pub fn private_key(&self) -> PrivatePkcs8KeyDer<'static> {
        self.pkcs8.clone_key()
    }

    /// The crypto provider every TLS config here uses.
    pub(crate) fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Sets the join key requesters must prove (from the cluster state).
    pub fn set_join_key(&self, key: [u8; 32]) {
        *self.join_key.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key);
    }

    /// What a node proves it holds the join key with: an HMAC of its own
    /// node id, useless to anyone else even if a peer collects it.
    pub fn join_proof(join_key: &[u8; 32], node: &PeerId) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, join_key);
        ring::hmac::sign(&key, &proof_message(node)).as_ref().to_vec()
    }

    /// Issues a certificate for `peer`'s key if `proof` shows it holds the
    /// current join key; returns (CA, certificate) DER.
    pub fn issue(&self, peer: &PeerId, proof: &[u8]) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
        if !self.can_issue() {
            return Err(PkiError::NotIssuer);
        }
        let join_key =
            (*self.join_key.read().unwrap_or_else(std::sync::PoisonError::into_inner)).ok_or(PkiError::NotReady)?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &join_key);
        ring::hmac::verify(&key, &proof_message(peer), proof).map_err(|_| PkiError::BadJoinProof)?;
        self.sign_for(peer)
    }

    fn sign_for(&self, peer: &PeerId) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
        let issuer_key = self.issuer().ok_or(PkiError::NotIssuer)?;
        let anchor = self.ca.get().ok_or(PkiError::NotEnrolled)?;
        if self.is_revoked(&peer.to_string()) {
            return Err(PkiError::Revoked(peer.to_string()));
        }
        let key = ed25519_key_of_peer(peer)?;
        let mut params = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_string()]).map_err(rcgen_error)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, peer.to_string());
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let issuer = rcgen::Issuer::new(ca_params(), issuer_key.as_ref());
        let cert = params.signed_by(&SubjectKey(key.to_bytes()), &issuer).map_err(rcgen_error)?;
        Ok((anchor.der.to_vec(), cert.der().to_vec()))
    }

    fn check_own(&self, cert: &CertificateDer<'_>) -> Result<(), PkiError> {
        self.verify_member(cert, &[], Usage::Client)?;
        if node_id_of(cert)? != self.node_id {
            return Err(PkiError::Invalid("the certificate is for another node's key".into()));
        }
        Ok(())
    }

    /// Takes in a certificate issued for this node (with the CA it came
    /// with), checks it and stores both.
    pub fn accept_enrollment(&self, ca: &[u8], cert: &[u8]) -> Result<(), PkiError> {
        let ca = CertificateDer::from(ca.to_vec());
        if let Some(expected) = self.expected_ca
            && fingerprint(&ca) != expected
        {
            return Err(PkiError::WrongCa { expected: hex(&expected), offered: hex(&fingerprint(&ca)) });
        }
        match self.ca.get() {
            Some(known) if known.der != ca => {
                return Err(PkiError::WrongCa {
                    expected: hex(&fingerprint(&known.der)),
                    offered: hex(&fingerprint(&ca)),
                });
            }
            Some(_) => {}
            None => {
                if self.expected_ca.is_none() {
                    return Err(PkiError::Invalid(
                        "this node has no join token to check the offered CA against: start it with --join and the token `llmesh init` prints".into(),
                    ));
                }
                let _ = self.ca.set(Anchor::new(ca.clone())?);
            }
        }
        let cert = CertificateDer::from(cert.to_vec());
        self.check_own(&cert)?;
        write_cert(&self.data_dir.join(CA_CERT_FILE), &ca)?;
        write_cert(&self.data_dir.join(NODE_CERT_FILE), &cert)?;
        let _ = self.cert.set(cert);
        self.enrolled.send_replace(true);
        Ok(())
    }

    /// Checks that `cert` chains to the cluster CA and belongs to a node
    /// that is not revoked; returns that node's id.
    pub fn verify_member(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
    ) -> Result<PeerId, PkiError> {
        let anchor = self.ca.get().ok_or(PkiError::NotEnrolled)?;
        let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| PkiError::Untrusted(e.to_string()))?;
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        parsed
            .verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                std::slice::from_ref(&anchor.anchor),
                intermediates,
                UnixTime::now(),
                eku,
                None,
                None,
            )
            .map_err(|e| PkiError::Untrusted(e.to_string()))?;
        let node = node_id_of(cert)?;
        if self.is_revoked(&node.to_string()) {
            return Err(PkiError::Revoked(node.to_string()));
        }
        Ok(node)
    }

    /// Whether an operator revoked `node_id`.
    pub fn is_revoked(&self, node_id: &str) -> bool {
        self.revoked.borrow().contains(node_id)
    }

    /// Replaces the revoked set (from the replicated cluster state).
    pub fn set_revoked(&self, revoked: BTreeSet<String>) {
        self.revoked.send_if_modified(|current| {
            if **current == revoked {
                return false;
            }
            *current = Arc::new(revoked);
            true
        });
    }

    /// Wakes whenever the revoked set changes.
    pub fn watch_revoked(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.revoked.subscribe()
    }

    /// The member a state's certificate names, verified at most once per
    /// [`VERIFIED_FOR`] (revocation is checked every time).
    fn verified_author(&self, der: &[u8]) -> Result<PeerId, PkiError> {
        let print = fingerprint(der);
        let now = Instant::now();
        let cached = self.verified.lock().ok().and_then(|cache| cache.get(&print).copied());
        if let Some((author, at)) = cached
            && now.saturating_duration_since(at) < VERIFIED_FOR
        {
            if self.is_revoked(&author.to_string()) {
                return Err(PkiError::Revoked(author.to_string()));
            }
            return Ok(author);
        }
        let author = self.verify_member(&CertificateDer::from(der), &[], Usage::Client)?;
        if let Ok(mut cache) = self.verified.lock() {
            if cache.len() >= VERIFIED_MAX {
                cache.retain(|_, (_, at)| now.saturating_duration_since(*at) < VERIFIED_FOR);
            }
            if cache.len() < VERIFIED_MAX {
                cache.insert(print, (author, now));
            }
        }
        Ok(author)
    }

    /// Signs a state for gossip; `None` until enrolled. With `with_cert`
    /// false the state travels without this node's certificate (readers
    /// that lack it fetch it).
    pub fn sign_state(&self, state: &NodeState, with_cert: bool) -> Option<SignedNodeState> {
        let cert = self.cert.get()?;
        let bytes = state.encode_to_vec();
        let mut message = STATE_SIGNING_CONTEXT.to_vec();
        message.extend_from_slice(&bytes);
        let signature = self.keypair.sign(&message).ok()?;
        let cert = if with_cert { cert.to_vec() } else { Vec::new() };
        Some(SignedNodeState { state: bytes, signature, cert })
    }

    /// Checks a gossiped state: its certificate (carried, or the one held
    /// for its author) is a live member's, the signature is by that
    /// certificate's key, and the state is about that node and came from
    /// it (`source`, the gossip author). A carried certificate is kept
    /// for the author's later states.
    pub fn open_state(&self, signed: &SignedNodeState, source: Option<PeerId>) -> Result<NodeState, PkiError> {
        let state =
            NodeState::decode(signed.state.as_slice()).map_err(|e| PkiError::BadState(format!("undecodable: {e}")))?;
        let cert: Arc<[u8]> = if signed.cert.is_empty() {
            let named = state.node_id.parse::<PeerId>().map_err(|e| PkiError::BadState(format!("node id: {e}")))?;
            // Checked before the lookup: a state relayed under another
            // author must not send this node fetching certificates.
            if source.is_some_and(|s| s != named) {
                return Err(PkiError::BadState(format!("state of {named} published by another node")));
            }
            self.member_cert(&named).ok_or(PkiError::CertUnknown(named))?
        } else {
            Arc::from(signed.cert.as_slice())
        };
        let author = self.verified_author(&cert)?;
        let mut message = STATE_SIGNING_CONTEXT.to_vec();
        message.extend_from_slice(&signed.state);
        if !ed25519_key_of(&CertificateDer::from(&cert[..]))?.verify(&message, &signed.signature) {
            return Err(PkiError::BadState("state signature does not verify".into()));
        }
        if state.node_id != author.to_string() {
            return Err(PkiError::BadState(format!("state names {} but is signed by {author}", state.node_id)));
        }
        if source.is_some_and(|s| s != author) {
            return Err(PkiError::BadState(format!("state of {author} published by another node")));
        }
        if !signed.cert.is_empty() {
            self.keep_member_cert(author, cert);
        }
        Ok(state)
    }

    /// The certificate held for `node`'s states, if any.
    pub fn member_cert(&self, node: &PeerId) -> Option<Arc<[u8]>> {
        self.members.lock().ok().and_then(|members| members.get(node).cloned())
    }

    /// `signed` with its author's certificate attached if it came
    /// without (what a snapshot or a certificate fetch serves).
    pub fn with_cert(&self, mut signed: SignedNodeState, author: &PeerId) -> Option<SignedNodeState> {
        if signed.cert.is_empty() {
            signed.cert = self.member_cert(author)?.to_vec();
        }
        Some(signed)
    }

    fn keep_member_cert(&self, author: PeerId, cert: Arc<[u8]>) {
        let Ok(mut members) = self.members.lock() else { return };
        if members.len() >= VERIFIED_MAX && !members.contains_key(&author) {
            // Far more members than a mesh has: forget revoked ones first,
            // then any one, so a newcomer is never refused.
            members.retain(|node, _| !self.is_revoked(&node.to_string()));
            if members.len() >= VERIFIED_MAX
                && let Some(any) = members.keys().next().copied()
            {
                members.remove(&any);
            }
        }
        members.insert(author, cert);
    }
}

/// The join key of [`test_cluster`]s.
#[cfg(test)]
pub(crate) const TEST_JOIN_KEY: [u8; 32] = [42; 32];

/// A cluster of `n` enrolled nodes in temporary directories (the first
/// holds the CA), for tests.
#[cfg(test)]
pub(crate) fn test_cluster(n: usize) -> (Vec<tempfile::TempDir>, Vec<Arc<Trust>>) {
    let mut dirs = Vec::new();
    let mut nodes: Vec<Arc<Trust>> = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().expect("tempdir");
        let trust = if i == 0 {
            create_ca(dir.path()).expect("ca");
            Trust::load(dir.path(), Keypair::generate_ed25519(), None).expect("seed")
        } else {
            let ca = nodes[0].ca_cert().map(|c| fingerprint(&c));
            let trust = Trust::load(dir.path(), Keypair::generate_ed25519(), ca).expect("member");
            nodes[0].set_join_key(TEST_JOIN_KEY);
            let proof = Trust::join_proof(&TEST_JOIN_KEY, &trust.node_id());
            let (ca, cert) = nodes[0].issue(&trust.node_id(), &proof).expect("issues");
            trust.accept_enrollment(&ca, &cert).expect("accepts");
            trust
        };
        dirs.push(dir);
        nodes.push(trust);
    }
    (dirs, nodes)
}

#[cfg(test)]
mod tests;
