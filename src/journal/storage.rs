//! The narrow I/O boundary of the journal: create a preallocated segment, write bytes into it,
//! make a range durable. Tests swap in `FaultyStorage` to fail syncs or tear writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::MmapMut;

/// One open segment file.
pub trait SegmentFile: Send {
    /// Copies `bytes` into the segment at `offset`. Not durable until `sync_range`.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset + len)` durable (msync with MS_SYNC).
    fn sync_range(&mut self, offset: u64, len: u64) -> io::Result<()>;
    fn size(&self) -> u64;
}

/// Creates and opens segment files.
pub trait Storage: Send {
    /// Creates a new file of exactly `size` bytes with its blocks allocated (a full disk fails
    /// here, not later with SIGBUS) and `header` durable at its start, and only then gives it
    /// its name `path` (atomically, then fsyncs the directory): a segment file under its real
    /// name always has a valid header, whenever the process is killed.
    fn create_segment(
        &mut self,
        path: &Path,
        size: u64,
        header: &[u8],
    ) -> io::Result<Box<dyn SegmentFile>>;
    /// Opens an existing segment for appending.
    fn open_segment(&mut self, path: &Path) -> io::Result<Box<dyn SegmentFile>>;
}

/// The real thing: files mapped with `memmap2`.
#[derive(Default)]
pub struct MmapStorage;

struct MmapSegment {
    _file: File,
    map: MmapMut,
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn preallocate(file: &File, size: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(size).map_err(|_| io::Error::other("segment size too large"))?;
    // SAFETY: the descriptor is valid for the lifetime of `file`; posix_fallocate has no memory
    // arguments.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn map(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the journal is the only writer of its segment files (one engine per data
    // directory, enforced by the lock file in `Journal::open`), and the file is never truncated
    // while mapped, so the mapping stays valid.
    unsafe { MmapMut::map_mut(file) }
}

/// The name a segment is built under before it is renamed to `path`.
pub fn temporary_segment_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    std::path::PathBuf::from(name)
}

impl Storage for MmapStorage {
    fn create_segment(
        &mut self,
        path: &Path,
        size: u64,
        header: &[u8],
    ) -> io::Result<Box<dyn SegmentFile>> {
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("segment {} already exists", path.display()),
            ));
        }
        let temporary = temporary_segment_path(path);
        // A leftover from a creation that was interrupted holds no record: start it over.
        let _ = std::fs::remove_file(&temporary);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        let built = (|| {
            preallocate(&file, size)?;
            let mut segment = MmapSegment {
                map: map(&file)?,
                _file: file,
            };
            segment.write_at(0, header)?;
            segment.sync_range(0, header.len() as u64)?;
            segment._file.sync_all()?;
            std::fs::rename(&temporary, path)?;
            if let Some(dir) = path.parent() {
                fsync_dir(dir)?;
            }
            Ok(segment)
        })();
        match built {
            Ok(segment) => Ok(Box::new(segment)),
            Err(e) => {
                let _ = std::fs::remove_file(&temporary);
                Err(e)
            }
        }
    }

    fn open_segment(&mut self, path: &Path) -> io::Result<Box<dyn SegmentFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let map = map(&file)?;
        Ok(Box::new(MmapSegment { _file: file, map }))
    }
}

impl SegmentFile for MmapSegment {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        let end = start
            .checked_add(bytes.len())
            .filter(|e| *e <= self.map.len());
        let end = end.ok_or_else(|| io::Error::other("write past the end of the segment"))?;
        self.map[start..end].copy_from_slice(bytes);
        Ok(())
    }

    fn sync_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        let len = usize::try_from(len).map_err(|_| io::Error::other("len"))?;
        self.map.flush_range(start, len)
    }

    fn size(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Fault injection for tests: wraps `MmapStorage`, and can fail every sync from a given count on,
/// or tear writes (write only the first `n` bytes of the next write, then fail).
#[derive(Clone, Default)]
pub struct FaultyStorage {
    pub faults: Arc<Faults>,
}

#[derive(Default)]
pub struct Faults {
    /// Syncs that succeed before every later one fails (u64::MAX: never fail).
    pub syncs_before_failure: AtomicU64,
    pub syncs_done: AtomicU64,
    /// If set, the next write copies only `tear_bytes` bytes, and the sync after it fails.
    pub tear_next_write: AtomicBool,
    pub tear_bytes: AtomicU64,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults {
            syncs_before_failure: AtomicU64::new(u64::MAX),
            ..Default::default()
        })
    }

    /// Counts one sync; `true` if it is one of those that must fail.
    fn count_sync(&self) -> bool {
        let done = self.syncs_done.fetch_add(1, Ordering::SeqCst);
        done >= self.syncs_before_failure.load(Ordering::SeqCst)
    }
}

struct FaultySegment {
    inner: Box<dyn SegmentFile>,
    faults: Arc<Faults>,
    torn: bool,
}

impl Storage for FaultyStorage {
    fn create_segment(
        &mut self,
        path: &Path,
        size: u64,
        header: &[u8],
    ) -> io::Result<Box<dyn SegmentFile>> {
        // Creating a segment syncs its header: it counts as one sync, and can fail as one.
        if self.faults.count_sync() {
            return Err(io::Error::other("injected fsync failure"));
        }
        let inner = MmapStorage.create_segment(path, size, header)?;
        Ok(Box::new(FaultySegment {
            inner,
            faults: self.faults.clone(),
            torn: false,
        }))
    }

    fn open_segment(&mut self, path: &Path) -> io::Result<Box<dyn SegmentFile>> {
        let inner = MmapStorage.open_segment(path)?;
        Ok(Box::new(FaultySegment {
            inner,
            faults: self.faults.clone(),
            torn: false,
        }))
    }
}

impl SegmentFile for FaultySegment {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if self.faults.tear_next_write.swap(false, Ordering::SeqCst) {
            let keep = (self.faults.tear_bytes.load(Ordering::SeqCst) as usize).min(bytes.len());
            self.torn = true;
            return self.inner.write_at(offset, &bytes[..keep]);
        }
        self.inner.write_at(offset, bytes)
    }

    fn sync_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let failing = self.faults.count_sync();
        if self.torn || failing {
            return Err(io::Error::other("injected fsync failure"));
        }
        self.inner.sync_range(offset, len)
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }
}
