//! Real disk use of the database file (`st_blocks`) and free space on its volume (`statvfs`,
//! or `fstatvfs` on a directory kept open: the writer asks before every round that writes).

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
    Ok(available(&s))
}

/// Bytes available to unprivileged writers, from a `statvfs` result.
fn available(s: &rustix::fs::StatVfs) -> u64 {
    s.f_bavail.saturating_mul(s.f_frsize)
}

/// The data directory, kept open so free space is read without a path lookup each time.
#[derive(Debug)]
pub struct Volume {
    path: std::path::PathBuf,
    dir: Option<std::fs::File>,
}

impl Volume {
    /// Opens `path` for `fstatvfs`; if it cannot be opened, each reading goes by its path.
    pub fn open(path: &Path) -> Self {
        Self { path: path.to_path_buf(), dir: std::fs::File::open(path).ok() }
    }

    /// Bytes available to unprivileged writers on the volume.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        match &self.dir {
            Some(dir) => {
                let s = rustix::fs::fstatvfs(dir).map_err(|e| StoreError::io("fstatvfs data directory", e.into()))?;
                Ok(available(&s))
            }
            None => volume_free_bytes(&self.path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_directory_reads_what_its_path_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let v = Volume::open(dir.path());
        assert!(v.dir.is_some(), "a directory opens for fstatvfs");
        let (by_fd, by_path) = (v.free_bytes().expect("fstatvfs"), volume_free_bytes(dir.path()).expect("statvfs"));
        // Other writers on the machine move the figure between the two calls: a few MiB at most.
        assert!(by_fd.abs_diff(by_path) < 64 << 20, "fstatvfs {by_fd} vs statvfs {by_path}");
        assert!(by_fd > 0);
        let missing = Volume::open(&dir.path().join("missing"));
        assert!(missing.dir.is_none());
        assert!(missing.free_bytes().is_err(), "a missing directory is an error, not zero free bytes");
    }
}
