//! The current snapshot, in a file of its own: `DATA/snapshot` (data version 7).
//!
//! Until data version 6 the snapshot was one value in sled's `snap` tree. Saving it held the
//! encoded snapshot, its stored form and sled's copy of it in memory at once: the spikes of the
//! 100,000-lease soak (docs/benchmarks.md, eleventh slice). Now it is encoded straight into the
//! file through a small buffer, and only its checksum is kept.
//!
//! Format, all of it covered by the checksum at the end:
//! ```text
//! MAGIC (8 bytes) | postcard(SnapshotMeta) | postcard(SnapshotPayload) | CRC-32 of all before (4 bytes, LE)
//! ```
//! The file is what Raft sends to a follower that needs a snapshot, byte for byte, so the
//! follower checks the same checksum before it installs it.
//!
//! Writing: into `snapshot.building` (or, for one the leader sent, received into
//! `snapshot.receiving` and checked), fsync, rename over `snapshot`, fsync the directory: a
//! crash leaves the old snapshot or the new one, never a mix. A snapshot older than the current
//! one never replaces it (a build that started before a newer snapshot was installed).
//!
//! Reading checks the magic, the checksum and that nothing follows the payload; a file that fails
//! is refused as damaged (sled's own checks never saw it).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use openraft::{BasicNode, LogId, SnapshotMeta};
use portmesh_core::State;
use serde::{Deserialize, Serialize};

use crate::ondisk::StoredRecord;

/// File names inside the data directory.
pub(crate) const FILE: &str = "snapshot";
pub(crate) const BUILDING: &str = "snapshot.building";
pub(crate) const RECEIVING: &str = "snapshot.receiving";
/// Where a follower wrote a received snapshot a second time before issue 19's fourteenth slice;
/// no longer written, only removed when left by a crash.
const INSTALLING: &str = "snapshot.installing";
/// The first bytes of a snapshot file: its kind, then its format's number.
const MAGIC: [u8; 8] = *b"pmsnap\x00\x01";

pub(crate) type Meta = SnapshotMeta<u64, BasicNode>;

/// The records of a snapshot, as read back.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotPayload {
    pub(crate) data_version: u32,
    pub(crate) records: Vec<StoredRecord>,
}

/// `SnapshotPayload` as it is written: the same format, its records serialized one at a time
/// straight from the state. Collecting them first held a copy of the whole state during every
/// snapshot (34 MB of heap at 60,000 leased allocations, heaptrack; docs/benchmarks.md).
#[derive(Serialize)]
pub(crate) struct SnapshotPayloadOf<'a> {
    pub(crate) data_version: u32,
    pub(crate) records: RecordsOf<'a>,
}

/// Every record of a state, serialized as the sequence `SnapshotPayload::records` reads.
pub(crate) struct RecordsOf<'a>(pub(crate) &'a State);

impl Serialize for RecordsOf<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // postcard writes the length first.
        let mut seq = s.serialize_seq(Some(self.0.record_count()))?;
        for r in self.0.records() {
            seq.serialize_element(&StoredRecord::from(r))?;
        }
        seq.end()
    }
}

/// A snapshot file read back whole and checked.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) meta: Meta,
    pub(crate) payload: SnapshotPayload,
}

/// A written snapshot file, not yet durable nor current.
#[derive(Debug)]
pub(crate) struct Written {
    path: PathBuf,
    file: File,
    /// Its size in bytes.
    pub(crate) len: u64,
}

/// The snapshot files of one data directory.
#[derive(Debug)]
pub(crate) struct Snapshots {
    dir: PathBuf,
    /// The last log id of the current snapshot (`None` for none, or one of an empty log). Held
    /// while a snapshot is made current, so that an older one never replaces a newer.
    current: Mutex<Option<LogId<u64>>>,
}

/// Counts and checksums what goes through it.
struct Summing<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Snapshots {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), current: Mutex::new(None) }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes the snapshot files a crash can leave half written (a build, a receive, the
    /// install of older versions) and returns the names removed. Called as the directory
    /// opens, once sled's lock is held and its version is known to be readable; never while a
    /// snapshot is being built or received.
    pub(crate) fn remove_leftovers(&self) -> io::Result<Vec<&'static str>> {
        let mut removed = Vec::new();
        for name in [BUILDING, RECEIVING, INSTALLING] {
            if remove_if_there(&self.path(name))? {
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// A new, empty file `name`, replacing one left there: a handle still open on that one keeps
    /// what it holds.
    fn create(&self, name: &str) -> io::Result<(PathBuf, File)> {
        let path = self.path(name);
        remove_if_there(&path)?;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Ok((path, file))
    }

    /// Writes `meta` and `payload` into a new file `name`, through a buffer: the encoded snapshot
    /// is never in memory whole. Not synced: see [`Snapshots::make_current`].
    pub(crate) fn write(&self, name: &str, meta: &Meta, payload: &impl Serialize) -> io::Result<Written> {
        let (path, file) = self.create(name)?;
        // The checksum is taken below the buffer, over its 64 KiB writes, not over each of
        // postcard's few-byte writes.
        let sum = Summing { inner: file, crc: crc32fast::Hasher::new(), len: 0 };
        let mut w = BufWriter::with_capacity(64 * 1024, sum);
        w.write_all(&MAGIC)?;
        postcard::to_io(meta, &mut w)
            .map_err(|e| io::Error::other(format!("encoding the snapshot's metadata: {e}")))?;
        postcard::to_io(payload, &mut w)
            .map_err(|e| io::Error::other(format!("encoding the snapshot: {e}")))?;
        let Summing { inner: mut file, crc, len } = w.into_inner().map_err(|e| e.into_error())?;
        file.write_all(&crc.finalize().to_le_bytes())?;
        Ok(Written { path, file, len: len + 4 })
    }

    /// A new, empty file to receive a snapshot from the leader into.
    pub(crate) fn receiving(&self) -> io::Result<File> {
        Ok(self.create(RECEIVING)?.1)
    }

    /// `file`, `len` bytes long, as a written file to make current as it is, if it is the file
    /// [`Snapshots::receiving`] made (the same inode at that path); `None` for any other file.
    pub(crate) fn as_received(&self, file: File, len: u64) -> io::Result<Option<Written>> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path(RECEIVING);
        let (got, there) = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(got), Ok(there)) => (got, there),
            (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let same = (got.dev(), got.ino()) == (there.dev(), there.ino());
        Ok(same.then_some(Written { path, file, len }))
    }

    /// Writes the bytes of a snapshot file (checked by [`decode`]) into a new file `name`. Not
    /// synced: see [`Snapshots::make_current`].
    pub(crate) fn write_bytes(&self, name: &str, bytes: &[u8]) -> io::Result<Written> {
        let (path, mut file) = self.create(name)?;
        file.write_all(bytes)?;
        Ok(Written { path, file, len: bytes.len() as u64 })
    }

    /// Makes a written file durable and, unless the current snapshot is newer, current. Returns
    /// the file, at its start, and whether it became current.
    pub(crate) fn make_current(&self, w: Written, last: Option<LogId<u64>>) -> io::Result<(File, bool)> {
        let Written { path, mut file, .. } = w;
        file.sync_all()?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let newer = *current <= last;
        if newer {
            std::fs::rename(&path, self.path(FILE))?;
            File::open(&self.dir)?.sync_all()?;
            *current = last;
        } else {
            remove_if_there(&path)?;
        }
        drop(current);
        file.seek(SeekFrom::Start(0))?;
        Ok((file, newer))
    }

    /// The current snapshot file, if there is one.
    fn open(&self) -> io::Result<Option<File>> {
        match File::open(self.path(FILE)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The current snapshot, read and checked, if there is one. Records its log id as current.
    pub(crate) fn read_current(&self) -> io::Result<Option<Loaded>> {
        let Some(mut file) = self.open()? else { return Ok(None) };
        let loaded = decode(&read_all(&mut file)?)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = loaded.meta.last_log_id;
        Ok(Some(loaded))
    }

    /// The current snapshot's metadata and its file, at its start, once its checksum is checked
    /// (a damaged snapshot is not sent to a follower), if there is one.
    pub(crate) fn open_current(&self) -> io::Result<Option<(Meta, File)>> {
        let Some(mut file) = self.open()? else { return Ok(None) };
        let (meta, _) = checked(&read_all(&mut file)?)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Some((meta, file)))
    }
}

/// Removes the file at `path`, if there is one; whether there was.
fn remove_if_there(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The contents of the bytes of a snapshot file, checked whole.
pub(crate) fn decode(b: &[u8]) -> io::Result<Loaded> {
    let (meta, payload) = checked(b)?;
    let (payload, rest) = postcard::take_from_bytes::<SnapshotPayload>(payload)
        .map_err(|e| invalid(format!("its records: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid(format!("{} bytes follow its records", rest.len())));
    }
    Ok(Loaded { meta, payload })
}

/// Every byte of `file`, from its start.
pub(crate) fn read_all(file: &mut File) -> io::Result<Vec<u8>> {
    let mut b = Vec::with_capacity(file.metadata().map_or(0, |m| m.len() as usize));
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut b)?;
    Ok(b)
}

/// The metadata of the bytes of a snapshot file and the bytes of its payload, once its header
/// and checksum are checked.
fn checked(b: &[u8]) -> io::Result<(Meta, &[u8])> {
    let Some((body, crc)) = b.split_last_chunk::<4>().filter(|(body, _)| body.starts_with(&MAGIC)) else {
        return Err(invalid(format!("not a portmesh snapshot file ({} bytes, no header)", b.len())));
    };
    let (want, got) = (u32::from_le_bytes(*crc), crc32fast::hash(body));
    if want != got {
        return Err(invalid(format!(
            "its checksum does not match ({} bytes, checksum {got:08x}, recorded {want:08x})",
            b.len()
        )));
    }
    postcard::take_from_bytes::<Meta>(&body[MAGIC.len()..]).map_err(|e| invalid(format!("its metadata: {e}")))
}
