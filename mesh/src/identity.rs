//! The node's identity key, kept in its data directory so its node id (the
//! libp2p peer id) stays the same across restarts.

use std::path::Path;

pub use libp2p::identity::Keypair;

use crate::store::{read_private, write_private};

const KEY_FILE: &str = "node.key";

/// A problem loading or creating the node key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but is not a key.
    #[error("{0} is not a valid node key: {1}")]
    Corrupt(String, String),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Loads the node key from `data_dir`, if there is one.
pub fn load_existing(data_dir: &Path) -> Result<Option<Keypair>, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let shown = path.display().to_string();
    let Some(bytes) = read_private(&path).map_err(|source| IdentityError::Io { path: shown.clone(), source })? else {
        return Ok(None);
    };
    Keypair::from_protobuf_encoding(&bytes).map(Some).map_err(|e| IdentityError::Corrupt(shown, e.to_string()))
}

/// Loads the node key from `data_dir`, creating an Ed25519 key on first
/// start. Returns the key and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> Result<(Keypair, bool), IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let shown = path.display().to_string();
    let io = |source| IdentityError::Io { path: shown.clone(), source };
    if let Some(bytes) = read_private(&path).map_err(io)? {
        let key = Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| IdentityError::Corrupt(shown.clone(), e.to_string()))?;
        return Ok((key, false));
    }
    let key = Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().map_err(|e| IdentityError::Corrupt(shown.clone(), e.to_string()))?;
    write_private(&path, &bytes).map_err(io)?;
    Ok((key, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_comes_back_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, created) = load_or_create(dir.path()).expect("creates");
        assert!(created);
        let (second, created) = load_or_create(dir.path()).expect("loads");
        assert!(!created);
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(KEY_FILE), b"garbage").expect("write");
        assert!(matches!(load_or_create(dir.path()), Err(IdentityError::Corrupt(..))));
    }
}
