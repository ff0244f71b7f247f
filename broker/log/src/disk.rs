//! Real disk use of the database file (`st_blocks`) and free space on its volume (`statvfs`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::StoreError;

/// Bytes the file really occupies on disk (sparse regions not counted).
pub fn file_disk_bytes(path: &Path) -> Result<u64, StoreError> {
    let m = std::fs::metadata(path).map_err(|e| StoreError::io("stat database file", e))?;
    Ok(m.blocks() * 512)
}

/// Bytes available to unprivileged writers on the volume holding `path`.
pub fn volume_free_bytes(path: &Path) -> Result<u64, StoreError> {
    let s = rustix::fs::statvfs(path).map_err(|e| StoreError::io("statvfs data directory", e.into()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}
