//! The node's persistent identity: an ed25519 keypair created on first start in the data
//! directory (file mode 0600) and read back on every later start, so the peer id never changes.

use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;

use super::P2pError;

const KEY_FILE: &str = "node.key";

pub fn load_or_create_keypair(data_dir: &Path) -> Result<Keypair, P2pError> {
    let path = data_dir.join(KEY_FILE);
    let io_error = |source| P2pError::Identity { path: path.clone(), reason: format!("{source}") };
    if path.exists() {
        let bytes = std::fs::read(&path).map_err(io_error)?;
        return Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| P2pError::Identity { path: path.clone(), reason: e.to_string() });
    }
    std::fs::create_dir_all(data_dir).map_err(io_error)?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| P2pError::Identity { path: path.clone(), reason: e.to_string() })?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(io_error)?;
    file.write_all(&bytes).map_err(io_error)?;
    tracing::info!(path = %path.display(), "created a new node identity");
    Ok(keypair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_survives_a_restart_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_keypair(dir.path()).unwrap();
        let second = load_or_create_keypair(dir.path()).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), b"garbage").unwrap();
        assert!(load_or_create_keypair(dir.path()).is_err());
    }
}
