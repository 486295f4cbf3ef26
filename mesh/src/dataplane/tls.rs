//! Certificates of the data plane, in one place.
//!
//! Each node makes a fresh self-signed certificate at start and announces
//! its SHA-256 fingerprint in its gossiped `NodeState`. Gossip messages are
//! signed with the node's libp2p key, so the fingerprint is bound to the
//! node id. Both ends of a QUIC connection check the other's certificate
//! against those announcements: a client connects only to the certificate
//! the peer announced, and a server accepts only client certificates of
//! live members. (The security issue replaces this with a cluster CA.)

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

/// ALPN of the data plane; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"llmesh/1";
/// Name every node's certificate carries; identity is the fingerprint.
pub const SERVER_NAME: &str = "llmesh";

/// SHA-256 of a certificate.
pub type Fingerprint = [u8; 32];

/// A problem with certificates or TLS configuration.
#[derive(Debug, thiserror::Error)]
#[error("data-plane TLS: {0}")]
pub struct TlsError(pub String);

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// This node's data-plane certificate and key.
pub struct NodeCert {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

impl NodeCert {
    /// A fresh self-signed certificate.
    pub fn generate() -> Result<NodeCert, TlsError> {
        let certified =
            rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(|e| TlsError(e.to_string()))?;
        let cert = certified.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        Ok(NodeCert { fingerprint: fingerprint(&cert), cert, key })
    }

    /// The fingerprint to announce in gossip.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Fingerprints of the peers allowed to call this node, kept current from
/// the membership view.
#[derive(Debug, Clone, Default)]
pub struct AllowedPeers(Arc<RwLock<HashSet<Fingerprint>>>);

impl AllowedPeers {
    /// Replaces the allowed set.
    pub fn replace(&self, fingerprints: HashSet<Fingerprint>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = fingerprints;
    }

    fn contains(&self, fp: &Fingerprint) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).contains(fp)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct ExpectFingerprint {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectFingerprint {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("peer certificate differs from the one it announced in gossip".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct MembersOnly {
    allowed: AllowedPeers,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for MembersOnly {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.allowed.contains(&fingerprint(end_entity)) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General("client certificate is not announced by any live member".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The server side: our certificate; callers must be live members.
pub fn server_crypto(cert: &NodeCert, allowed: AllowedPeers) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(MembersOnly { allowed, provider: provider.clone() });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.cert.clone()], cert.key())
        .map_err(|e| TlsError(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The client side towards one peer: expect exactly the certificate it
/// announced, and present ours.
pub fn client_crypto(cert: &NodeCert, expected: Fingerprint) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ExpectFingerprint { expected, provider: provider.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert.cert.clone()], cert.key())
        .map_err(|e| TlsError(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}
