//! Mutual TLS between members, for the QUIC data plane and the gRPC control
//! plane alike: each side presents its CA-issued certificate and accepts
//! only a certificate of a member that is not revoked (and, when dialling a
//! known node, only that node's).

use std::sync::Arc;

use libp2p::PeerId;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use super::{PkiError, Trust, Usage};

/// Name every node certificate carries; identity is the key, not the name.
pub const SERVER_NAME: &str = "llmesh";

/// The certificate chain a TLS peer presented, as rustls hands it over.
pub fn peer_node_id(trust: &Trust, certs: &[CertificateDer<'_>]) -> Result<PeerId, PkiError> {
    let (end_entity, intermediates) =
        certs.split_first().ok_or_else(|| PkiError::Untrusted("no certificate".into()))?;
    trust.verify_member(end_entity, intermediates, Usage::Client)
}

/// Verifies peers against the cluster CA and the revoked set.
#[derive(Debug)]
struct MemberVerifier {
    trust: Arc<Trust>,
    /// When dialling: the only node acceptable at the other end.
    expect: Option<PeerId>,
}

impl MemberVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        let node = self
            .trust
            .verify_member(end_entity, intermediates, usage)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        match self.expect {
            Some(expected) if expected != node => {
                Err(rustls::Error::General(format!("expected node {expected}, the peer is {node}")))
            }
            _ => Ok(()),
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.trust.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.trust.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.trust.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, Usage::Server).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for MemberVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, Usage::Client).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

fn chain(trust: &Trust) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let cert = trust.cert().ok_or(PkiError::NotEnrolled)?;
    Ok((vec![cert], PrivateKeyDer::Pkcs8(trust.private_key())))
}

fn tls_error(err: rustls::Error) -> PkiError {
    PkiError::Invalid(format!("TLS configuration: {err}"))
}

/// A server that presents this node's certificate and requires members'.
pub fn server_config(trust: &Arc<Trust>, alpn: &[u8]) -> Result<rustls::ServerConfig, PkiError> {
    let (certs, key) = chain(trust)?;
    let verifier = Arc::new(MemberVerifier { trust: trust.clone(), expect: None });
    let mut config = rustls::ServerConfig::builder_with_provider(trust.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(tls_error)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A client that presents this node's certificate and accepts a member
/// (`expect`: exactly that node).
pub fn client_config(
    trust: &Arc<Trust>,
    expect: Option<PeerId>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, PkiError> {
    let (certs, key) = chain(trust)?;
    let verifier = Arc::new(MemberVerifier { trust: trust.clone(), expect });
    let mut config = rustls::ClientConfig::builder_with_provider(trust.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(tls_error)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}
