//! Files that are replaced whole, so that a crash leaves the old or the new version.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::error::StoreError;

/// More than any file the daemon writes (a state.toml of 10,000 assignments is about 2 MiB).
pub const MAX_OWN_FILE: u64 = 16 << 20;

/// TOML errors span several lines (a source excerpt); our messages are one line.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replaces `dir/name` with `contents` so that a crash leaves the old or the new file: a temp
/// file in the same directory (same filesystem, so rename is atomic), fsync, rename, fsync dir.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    temp.write_all(contents)?;
    temp.as_file().sync_all()?;
    // On error the temp file is removed when the returned error drops it.
    temp.persist(dir.join(name)).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Removes `dir/name` and makes the removal durable; absent is fine.
pub fn remove_durably(dir: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => File::open(dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads a file the daemon wrote itself (state.toml, a journal); `None` when absent. Only a
/// regular file is read, never through a symbolic link: a link planted in the state dir would
/// have the root daemon read, and quote in its errors, whatever file it points at.
pub fn read_own_file(path: &Path) -> Result<Option<String>, StoreError> {
    let unusable = |why: String| StoreError::Unusable {
        path: path.to_owned(),
        why,
    };
    let io = |source: io::Error| StoreError::Io {
        what: "reading",
        path: path.to_owned(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a FIFO planted there must not hang the start; it is refused below.
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(Errno::ELOOP as i32) => {
            return Err(unusable(
                "it is a symbolic link, and passthroughd reads only the regular file it wrote \
                 there; remove the link"
                    .into(),
            ));
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(unusable(
            "it is not a regular file; move it away (passthroughd writes a new one)".into(),
        ));
    }
    if meta.len() > MAX_OWN_FILE {
        return Err(unusable(format!(
            "it is {} bytes, more than passthroughd ever writes ({MAX_OWN_FILE}); move it away",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_OWN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    String::from_utf8(bytes).map(Some).map_err(|e| {
        unusable(format!(
            "it is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })
}
