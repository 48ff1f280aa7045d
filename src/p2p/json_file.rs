//! The small JSON files a node keeps in its data dir (members, revoked peers, peers met,
//! invitations), each written whole to a temporary file and renamed over the old one, so a crash
//! mid-write never leaves half a file.

use std::path::Path;

use serde::Serialize;

pub fn save_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}
