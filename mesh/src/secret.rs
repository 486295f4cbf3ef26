//! The cluster secret and the join token that carries it.
//!
//! Every node of a cluster holds the same 32-byte secret. It keys libp2p's
//! private network (`pnet`), so a machine without it cannot complete even
//! the first handshake. `llmesh init` creates it and prints a join token:
//! `lmj2.<secret: 64 hex>.<SHA-256 of the cluster CA certificate: 64 hex>`
//! optionally followed by `.<base64url of bootstrap addresses,
//! comma-separated>`, where the third part is the join key: a joining node
//! proves it holds it to get a certificate, and rotating it (`llmesh token
//! rotate`) retires every token printed before. The CA fingerprint lets a
//! joining node check the CA it is handed (see [`crate::pki`]).

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libp2p::Multiaddr;

use crate::store::{read_private, write_private};

const TOKEN_PREFIX: &str = "lmj2";
const SECRET_FILE: &str = "cluster.secret";

/// A problem with the cluster secret, a join token or the data directory.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The token is not one `llmesh init` prints.
    #[error("invalid join token: {0}")]
    BadToken(String),
    /// The data directory already belongs to another cluster.
    #[error(
        "{0} holds the secret of a different cluster; use another --data-dir, or delete that file to move this node"
    )]
    OtherCluster(String),
    /// Reading or writing the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The shared secret of one cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; 32]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret itself.
        write!(f, "ClusterSecret({})", self.fingerprint())
    }
}

impl ClusterSecret {
    /// A fresh random secret.
    pub fn generate() -> ClusterSecret {
        ClusterSecret(rand::random())
    }

    /// The raw bytes (the pnet pre-shared key).
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A short non-secret name for logs: the first bytes of a hash.
    pub fn fingerprint(&self) -> String {
        libp2p::pnet::PreSharedKey::new(self.0).fingerprint().to_string().chars().take(16).collect()
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<ClusterSecret> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ClusterSecret(out))
    }

    /// The join key a cluster starts with, derived from the secret (until
    /// an operator rotates it; see [`crate::pki`]).
    pub fn initial_join_key(&self) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&key, b"llmesh-join-key-v1");
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Encrypts `plain` (the CA key) so that only holders of this secret
    /// can read it: ChaCha20-Poly1305 under a key derived from the secret,
    /// a random nonce first.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let mut out = plain.to_vec();
        // Sealing fails only for inputs of gigabytes.
        let tag = self
            .sealing_key()
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut out,
            )
            .map(|t| t.as_ref().to_vec())
            .unwrap_or_default();
        out.extend_from_slice(&tag);
        [nonce.to_vec(), out].concat()
    }

    /// Decrypts what [`ClusterSecret::seal`] made with the same secret.
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(12)?;
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self.sealing_key().open_in_place(nonce, ring::aead::Aad::empty(), &mut body).ok()?;
        Some(plain.to_vec())
    }

    fn sealing_key(&self) -> ring::aead::LessSafeKey {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let derived = ring::hmac::sign(&key, b"llmesh-ca-key-seal-v1");
        // 32 bytes is CHACHA20_POLY1305's key length, so this cannot fail.
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &derived.as_ref()[..32])
            .unwrap_or_else(|_| unreachable!("a 32-byte key"));
        ring::aead::LessSafeKey::new(unbound)
    }

    /// The secret stored in `data_dir`, if any.
    pub fn load(data_dir: &Path) -> Result<Option<ClusterSecret>, SecretError> {
        let path = data_dir.join(SECRET_FILE);
        let Some(text) = read_private(&path).map_err(|source| io(&path, source))? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&text);
        ClusterSecret::from_hex(&text)
            .map(Some)
            .ok_or_else(|| SecretError::BadToken(format!("{} is not a cluster secret", path.display())))
    }

    /// Stores the secret in `data_dir`; refuses to replace a different one.
    pub fn store(&self, data_dir: &Path) -> Result<(), SecretError> {
        let path = data_dir.join(SECRET_FILE);
        match ClusterSecret::load(data_dir)? {
            Some(existing) if existing == *self => Ok(()),
            Some(_) => Err(SecretError::OtherCluster(path.display().to_string())),
            None => write_private(&path, self.to_hex().as_bytes()).map_err(|source| io(&path, source)),
        }
    }

    /// The secret in `data_dir`, created there when missing.
    pub fn load_or_create(data_dir: &Path) -> Result<(ClusterSecret, bool), SecretError> {
        if let Some(secret) = ClusterSecret::load(data_dir)? {
            return Ok((secret, false));
        }
        let secret = ClusterSecret::generate();
        secret.store(data_dir)?;
        Ok((secret, true))
    }
}

fn io(path: &Path, source: std::io::Error) -> SecretError {
    SecretError::Io { path: path.display().to_string(), source }
}

/// What a join token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The cluster secret.
    pub secret: ClusterSecret,
    /// SHA-256 of the cluster CA's certificate.
    pub ca: [u8; 32],
    /// The join key (proves the right to a certificate).
    pub join: [u8; 32],
    /// Addresses of nodes to contact first.
    pub bootstrap: Vec<Multiaddr>,
}

impl JoinToken {
    /// The printable token.
    pub fn encode(&self) -> String {
        let mut token = format!(
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.secret.to_hex(),
            crate::pki::hex(&self.ca),
            crate::pki::hex(&self.join)
        );
        if !self.bootstrap.is_empty() {
            let joined = self.bootstrap.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            token.push('.');
            token.push_str(&URL_SAFE_NO_PAD.encode(joined));
        }
        token
    }

    /// Parses a token printed by [`JoinToken::encode`].
    pub fn decode(token: &str) -> Result<JoinToken, SecretError> {
        let mut parts = token.trim().split('.');
        if parts.next() != Some(TOKEN_PREFIX) {
            let hint = if token.trim().starts_with("lmj1.") {
                " (this is a token from an older llmesh without a cluster CA: run `llmesh init` again on the first node)"
            } else {
                ""
            };
            return Err(SecretError::BadToken(format!("it must start with '{TOKEN_PREFIX}.'{hint}")));
        }
        let secret = parts
            .next()
            .and_then(ClusterSecret::from_hex)
            .ok_or_else(|| SecretError::BadToken("the secret part is not 64 hex characters".into()))?;
        let ca = parts
            .next()
            .and_then(ClusterSecret::from_hex)
            .map(|fingerprint| fingerprint.0)
            .ok_or_else(|| SecretError::BadToken("the CA fingerprint part is not 64 hex characters".into()))?;
        let join = parts
            .next()
            .and_then(ClusterSecret::from_hex)
            .map(|key| key.0)
            .ok_or_else(|| SecretError::BadToken("the join key part is not 64 hex characters".into()))?;
        let bootstrap = match parts.next() {
            None => Vec::new(),
            Some(encoded) => {
                let bytes = URL_SAFE_NO_PAD
                    .decode(encoded)
                    .map_err(|e| SecretError::BadToken(format!("bootstrap part: {e}")))?;
                let text =
                    String::from_utf8(bytes).map_err(|e| SecretError::BadToken(format!("bootstrap part: {e}")))?;
                text.split(',')
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        a.parse::<Multiaddr>()
                            .map_err(|e| SecretError::BadToken(format!("bootstrap address '{a}': {e}")))
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        if parts.next().is_some() {
            return Err(SecretError::BadToken("too many parts".into()));
        }
        Ok(JoinToken { secret, ca, join, bootstrap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_secret_opens_what_it_sealed() {
        let secret = ClusterSecret::generate();
        let sealed = secret.seal(b"ca key pem");
        assert_eq!(secret.open(&sealed).as_deref(), Some(&b"ca key pem"[..]));
        assert_ne!(sealed, secret.seal(b"ca key pem"), "a fresh nonce each time");
        assert_eq!(ClusterSecret::generate().open(&sealed), None, "another cluster's secret");
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert_eq!(secret.open(&tampered), None);
        assert_eq!(secret.open(&sealed[..5]), None);
    }

    #[test]
    fn token_round_trips_with_and_without_bootstrap() {
        let secret = ClusterSecret::generate();
        let bare = JoinToken { secret: secret.clone(), ca: [7; 32], join: [8; 32], bootstrap: vec![] };
        assert_eq!(JoinToken::decode(&bare.encode()).expect("decodes"), bare);
        let with = JoinToken {
            secret,
            ca: [9; 32],
            join: [3; 32],
            bootstrap: vec!["/ip4/10.0.0.5/tcp/11441".parse().expect("addr"), "/ip6/::1/tcp/7".parse().expect("addr")],
        };
        assert_eq!(JoinToken::decode(&with.encode()).expect("decodes"), with);
    }

    #[test]
    fn bad_tokens_are_rejected_with_a_reason() {
        let secret = "ab".repeat(32);
        for bad in [
            "",
            "lmj2.00",
            "lmj2.zz",
            "lmj2.",
            &format!("lmj1.{secret}"),
            &format!("lmj2.{secret}"),
            &format!("lmj2.{secret}.{secret}"),
            &format!("lmj2.{secret}.{secret}.{secret}.!!"),
            &format!("lmj2.{secret}.{}", "a".repeat(63)),
        ] {
            assert!(JoinToken::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_is_stored_once_and_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, created) = ClusterSecret::load_or_create(dir.path()).expect("creates");
        assert!(created);
        let (again, created) = ClusterSecret::load_or_create(dir.path()).expect("loads");
        assert!(!created);
        assert_eq!(first, again);
        assert!(matches!(ClusterSecret::generate().store(dir.path()), Err(SecretError::OtherCluster(_))));
        assert!(!format!("{first:?}").contains(&first.to_hex()));
    }
}
