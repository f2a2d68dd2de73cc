//! Files that are replaced whole, so that a crash leaves the old or the new version.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

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
