//! Files only their owner may read: a node's data directory, its home (`node.json`, the log,
//! the launch record, stack records). Directories are 0700 and files 0600 on Unix; elsewhere
//! the system's defaults apply.

use std::io::{self, Write};
use std::path::Path;

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Creates `dir` (and its parents) and makes it readable by its owner only. An existing
/// directory is restricted too.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)
}

/// Restricts `dir` and everything below it: directories 0700, files 0600. Links are left alone.
pub fn restrict_tree(dir: &Path) -> io::Result<()> {
    set_mode(dir, 0o700)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            restrict_tree(&entry.path())?;
        } else if kind.is_file() {
            set_mode(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

fn options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Writes `path` atomically (a temporary file beside it, renamed over it), readable by its
/// owner only.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = options().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    set_mode(&tmp, 0o600)?;
    std::fs::rename(&tmp, path)
}

/// Creates (or empties) `path` for writing, readable by its owner only.
pub fn create(path: &Path) -> io::Result<std::fs::File> {
    let f = options().write(true).create(true).truncate(true).open(path)?;
    set_mode(path, 0o600)?;
    Ok(f)
}

/// Opens `path` for appending (a log), creating it readable by its owner only.
pub fn append(path: &Path) -> io::Result<std::fs::File> {
    let f = options().create(true).append(true).open(path)?;
    set_mode(path, 0o600)?;
    Ok(f)
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn directories_and_files_are_the_owners_only() {
        let t = tempfile_dir();
        let dir = t.join("home/data");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("node.json");
        write(&f, b"{}").unwrap();
        assert_eq!((mode(&f), std::fs::read(&f).unwrap()), (0o600, b"{}".to_vec()));
        let log = dir.join("node.log");
        append(&log).unwrap().write_all(b"a\n").unwrap();
        append(&log).unwrap().write_all(b"b\n").unwrap();
        assert_eq!((mode(&log), std::fs::read_to_string(&log).unwrap()), (0o600, "a\nb\n".to_string()));
        let loose = dir.join("sub/db");
        std::fs::create_dir_all(loose.parent().unwrap()).unwrap();
        std::fs::write(&loose, b"x").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        restrict_tree(&t.join("home")).unwrap();
        assert_eq!((mode(&loose), mode(loose.parent().unwrap())), (0o600, 0o700));
        std::fs::remove_dir_all(&t).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("portmesh-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }
}
