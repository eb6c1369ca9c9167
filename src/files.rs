//! File utilities every stage uses: atomic writes and the lock on an output folder.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The name of [`DirLock`]'s file inside the folder it locks.
pub const LOCK_FILE: &str = ".gmpq.lock";

/// An exclusive lock on an output folder (`DIR/.gmpq.lock`), held while one process writes
/// there: two processes resuming the same run would otherwise interleave checkpoints and
/// delete each other's temp files. The OS drops it when the process dies, so a killed run
/// never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
    dir: PathBuf,
    /// The folder held nothing when it was locked: if nothing was written to it, dropping
    /// the lock removes it, so a command that fails early leaves no empty run folder.
    was_empty: bool,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if !self.was_empty {
            return;
        }
        let only_lock = std::fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| e.file_name() == std::ffi::OsStr::new(LOCK_FILE))
        });
        if only_lock {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another gmpq process{holder}; wait for it or choose another folder"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DirLock {
    /// Locks `dir` (created if missing) without waiting.
    pub fn acquire(dir: &Path) -> std::result::Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let was_empty = std::fs::read_dir(dir)
            .map_err(io)?
            .flatten()
            .all(|e| e.file_name() == std::ffi::OsStr::new(LOCK_FILE));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(LockError::Busy {
                    dir: dir.into(),
                    holder: if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder, for the message another process gets (the folder may be shared by
        // several machines, e.g. a cluster's nodes).
        file.set_len(0).map_err(io)?;
        file.write_all(format!("{} on {}", std::process::id(), hostname()).as_bytes())
            .map_err(io)?;
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
            was_empty,
        })
    }
}

/// This machine's host name (`?` if it has none).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename, and
/// fsync of the folder so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes temp files that an interrupted [`write_atomic`] into `dir` left behind.
pub fn remove_stale_temps(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"hello").unwrap();
        write_atomic(&p, b"world").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"world");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_locked_folder_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = DirLock::acquire(&run).unwrap();
        let err = DirLock::acquire(&run).unwrap_err().to_string();
        assert!(
            err.contains("in use by another gmpq process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        DirLock::acquire(&run).unwrap();
    }
}
