//! Files that make a data directory the seed of a cluster: the admin
//! credential and the marker that tells the agent to start the Raft group.
//!
//! Only the node that created the cluster secret (by `llmesh init`, or by a
//! first `llmesh agent` without `--join`) gets them, so exactly one node
//! ever starts a Raft group; every other node waits to be added by its
//! leader. The marker is ignored once the Raft store holds anything.

use std::path::{Path, PathBuf};

use crate::coordinator::admin::{ADMIN_TOKEN_FILE, new_admin_token};
use crate::coordinator::state::secret_hash;

const SEED_MARKER: &str = "raft.seed";

/// Why the cluster files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The cluster CA could not be created.
    #[error("cluster CA: {0}")]
    Pki(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterFileError + '_ {
    move |source| ClusterFileError::Io { path: path.to_path_buf(), source }
}

/// Writes the admin credential (0600), the cluster CA and the seed marker
/// for a cluster this directory just created.
pub fn make_seed(dir: &Path) -> Result<(), ClusterFileError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    crate::pki::create_ca(dir).map_err(|e| ClusterFileError::Pki(e.to_string()))?;
    let token_path = dir.join(ADMIN_TOKEN_FILE);
    if !token_path.exists() {
        write_private(&token_path, format!("{}\n", new_admin_token()).as_bytes())?;
    }
    let marker = dir.join(SEED_MARKER);
    std::fs::write(&marker, b"this node created the cluster and starts its Raft group\n").map_err(io(&marker))
}

/// The admin credential stored in `dir`, if any.
pub fn admin_token(dir: &Path) -> Result<Option<String>, ClusterFileError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_string()).filter(|t| !t.is_empty())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io(&path)(err)),
    }
}

const JOIN_KEY_FILE: &str = "join.key";

/// Records the join key after a rotation, so `llmesh init` on this
/// directory prints the current token.
pub fn store_join_key(dir: &Path, key: &[u8; 32]) -> Result<(), ClusterFileError> {
    replace_private(&dir.join(JOIN_KEY_FILE), format!("{}\n", crate::pki::hex(key)).as_bytes())
}

/// The join key for tokens printed from `dir`: the last rotated one stored
/// here, else the cluster's initial key.
pub fn join_key(dir: &Path, secret: &crate::ClusterSecret) -> Result<[u8; 32], ClusterFileError> {
    let path = dir.join(JOIN_KEY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(secret.initial_join_key()),
        Err(err) => return Err(io(&path)(err)),
    };
    let text = text.trim();
    let mut key = [0u8; 32];
    let valid = text.len() == 64
        && key.iter_mut().enumerate().all(|(i, b)| {
            text.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).map(|v| *b = v).is_some()
        });
    if valid { Ok(key) } else { Err(ClusterFileError::Pki(format!("{} is not a join key", path.display()))) }
}

const BOOTSTRAP_FILE: &str = "bootstrap.addrs";

/// Records the cluster's bootstrap addresses (one per line), so tokens
/// printed from `dir` carry them.
pub fn store_bootstrap_addrs(dir: &Path, addrs: &[String]) -> Result<(), ClusterFileError> {
    let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    replace_private(&dir.join(BOOTSTRAP_FILE), text.as_bytes())
}

/// The bootstrap addresses recorded in `dir` (none when absent).
pub fn bootstrap_addrs(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(BOOTSTRAP_FILE))
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether `dir` belongs to the node that created its cluster.
pub fn is_seed(dir: &Path) -> bool {
    dir.join(SEED_MARKER).exists()
}

/// `Some(hash of the admin credential)` when `dir` is a seed.
pub fn seed(dir: &Path) -> Result<Option<Vec<u8>>, ClusterFileError> {
    if !dir.join(SEED_MARKER).exists() {
        return Ok(None);
    }
    Ok(admin_token(dir)?.map(|t| secret_hash(&t)))
}

/// Replaces `path` with `bytes` through a rename, so that a reader (`llmesh
/// init` printing a token while the agent records a new key) sees the old
/// file or the new one, never an empty or half-written one. The file
/// written first has a name of its own per process and call: two writers
/// at once (`llmesh token rotate` and the agent on the same directory both
/// record the rotated key) would otherwise remove or rename each other's.
fn replace_private(path: &Path, bytes: &[u8]) -> Result<(), ClusterFileError> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".new.{}.{write}", std::process::id()));
    let fresh = path.with_file_name(name);
    let _ = std::fs::remove_file(&fresh);
    write_private(&fresh, bytes)?;
    std::fs::rename(&fresh, path).map_err(|err| {
        let _ = std::fs::remove_file(&fresh);
        io(path)(err)
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ClusterFileError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_directory_has_a_private_admin_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(seed(dir.path()).expect("reads"), None);
        make_seed(dir.path()).expect("writes");
        let token = admin_token(dir.path()).expect("reads").expect("token");
        assert!(token.starts_with("lma_"));
        assert_eq!(seed(dir.path()).expect("reads"), Some(secret_hash(&token)));
        // Making it again keeps the credential.
        make_seed(dir.path()).expect("writes");
        assert_eq!(admin_token(dir.path()).expect("reads"), Some(token));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE)).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_reader_never_sees_a_half_written_join_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = crate::ClusterSecret::generate();
        store_join_key(dir.path(), &[1; 32]).expect("writes");
        let writer = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || {
                for i in 0..300u32 {
                    store_join_key(&dir, &[(i % 250) as u8 + 1; 32]).expect("writes");
                }
            })
        };
        // As `llmesh init` does while the agent records keys.
        let mut reads = 0;
        while !writer.is_finished() && reads < 100_000 {
            let key = join_key(dir.path(), &secret).expect("a whole key every time");
            assert_ne!(key, secret.initial_join_key(), "the file was missing for a moment");
            reads += 1;
        }
        writer.join().expect("writer");
        assert_eq!(join_key(dir.path(), &secret).expect("reads"), [(299 % 250) as u8 + 1; 32]);
    }

    #[test]
    fn two_writers_at_once_both_succeed() {
        // `llmesh token rotate` and the agent on the same directory record
        // the same rotated key at the same moment (CI failed once on it:
        // the CLI's rename found its file taken by the agent).
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = crate::ClusterSecret::generate();
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    for _ in 0..300 {
                        store_join_key(&dir, &[7; 32]).expect("every write succeeds");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        assert_eq!(join_key(dir.path(), &secret).expect("reads"), [7; 32]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("lists")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| n != JOIN_KEY_FILE)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
