//! The durable journal: fixed-size, preallocated, mmap'd segment files of checksummed, chained
//! record frames; group commit; recovery; snapshots.
//!
//! Architecture invariant: the journal knows the record codec but no business rules, and never
//! reports a sequence as durable before the sync that covers it returned successfully. A failed
//! sync is never retried: the writer is poisoned and every later call fails.

pub mod format;
pub mod reader;
pub mod snapshot;
pub mod storage;
pub mod tail;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::core::CommandRecord;
use crate::core::codec::{encode_record, payload_len};
use format::{
    DURABLE_FILE_NAME, FRAME_HEADER_BYTES, MAX_FRAME_BYTES, RESERVE_FILE_NAME,
    SEGMENT_HEADER_BYTES, UNSYNCED_FILE_NAME, decode_unsynced, encode_durable,
    encode_segment_header, encode_unsynced, parse_segment_file_name, seal_frame, segment_file_name,
};
pub use reader::{
    JournalEnd, JournalError, durable_watermark, estimate_records, list_segments,
    read_durable_watermark, scan, scan_pipelined, scan_pipelined_batches,
};
use storage::{SegmentFile, Storage};

/// How and when written records are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Group commit: one msync of the written range per batch taken from the ring.
    Batch,
    /// At most one msync per interval; a batch waits for it, so replies still follow durability.
    Interval(Duration),
    /// Page cache only: survives a process crash, NOT a power loss or kernel crash.
    None,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(text: &str) -> Result<SyncMode, String> {
        match text {
            "batch" => Ok(SyncMode::Batch),
            "none" => Ok(SyncMode::None),
            _ => {
                let ms = text
                    .strip_prefix("interval=")
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        format!("unknown sync mode {text:?}: use batch, interval=<ms> or none")
                    })?;
                // A reply waits up to an interval for its sync: past this it is not group
                // commit but a stall.
                if ms == 0 {
                    return Err(
                        "sync interval=0 would sync after every batch: that is --sync batch".into(),
                    );
                }
                if ms > MAX_SYNC_INTERVAL_MS {
                    return Err(format!(
                        "sync interval={ms} is longer than {MAX_SYNC_INTERVAL_MS} ms: a write could wait that long for its sync"
                    ));
                }
                Ok(SyncMode::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

/// The longest `--sync interval=<ms>`.
pub const MAX_SYNC_INTERVAL_MS: u64 = 1000;

#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub segment_size_bytes: u64,
    pub sync: SyncMode,
}

pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 256 << 20;
/// The smallest segment size: a page (the header and at least one record must fit).
pub const MIN_SEGMENT_SIZE_BYTES: u64 = 4096;
/// The largest segment: each is preallocated and mapped whole, and one past a few GiB only
/// makes recovery's scans and a full disk's refusals coarser.
pub const MAX_SEGMENT_SIZE_BYTES: u64 = 1 << 30;

/// Refuses a segment size outside `MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES`, naming
/// `--segment-size` (a huge one was "too large" for the file system, and every write was then
/// refused as if the disk were full).
pub fn check_segment_size(bytes: u64) -> Result<(), String> {
    if (MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&bytes) {
        Ok(())
    } else {
        Err(format!(
            "--segment-size must be within {MIN_SEGMENT_SIZE_BYTES}..={MAX_SEGMENT_SIZE_BYTES} \
             bytes, not {bytes}"
        ))
    }
}
/// Bytes buffered before they are copied into the mapping, even inside one batch.
const PENDING_LIMIT_BYTES: usize = 1 << 20;

/// Appends records. Owned by the journal stage (one thread).
pub struct JournalWriter {
    storage: Box<dyn Storage>,
    config: JournalConfig,
    segment: Option<Box<dyn SegmentFile>>,
    /// Offset in the current segment where the next byte goes (pending bytes not included).
    write_offset: u64,
    /// Offset up to which the current segment is durable.
    synced_offset: u64,
    pending: Vec<u8>,
    next_seq: u64,
    last_crc: u32,
    /// The last sequence number whose record is durable (0: none yet).
    durable_seq: u64,
    last_sync: Instant,
    poisoned: bool,
    bytes_written: u64,
    /// `journal/durable`: the durable watermark for readers outside the engine (see
    /// `docs/journal-format.md`).
    durable_file: std::fs::File,
    /// The watermark last written there.
    published_seq: u64,
    /// When `journal/durable` was last made durable (`WATERMARK_SYNC_EVERY`), and the value
    /// it held then.
    watermark_synced: Instant,
    watermark_synced_seq: u64,
    /// The writer keeps a reserve (`keep_reserve`).
    reserve: bool,
    /// It keeps one and holds none (`RESERVE_FILE_NAME`): a roll-over used it, or it could not
    /// be allocated. While this is set the engine takes no new work (`space_short`).
    space_short: bool,
    /// When the reserve was last tried again, while `space_short`.
    reserve_tried: Instant,
    /// A torn tail found at open whose bytes could not be kept for want of space: not cut yet,
    /// and nothing is written until it is (`finish_cut`, tried with the reserve). The writer
    /// is short of space meanwhile.
    pending_cut: Option<PendingCut>,
}

/// A torn tail waiting to be kept and cut: `[from, to)` of the open segment at `path`.
struct PendingCut {
    path: PathBuf,
    from: u64,
    to: u64,
}

/// How often the rewrites of `journal/durable` are made durable (fdatasync, about 0.15 ms
/// here): after a power loss the file lags the acknowledgements by at most this much, plus the
/// time since the last commit. Recovery cuts damage past the file's value as a torn tail, so
/// without it the window was the kernel's writeback delay (30 s by default).
pub const WATERMARK_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a writer that is short of space tries to allocate its reserve again.
pub const RESERVE_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// A full disk, or a full quota.
fn is_no_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Opens (creating if needed) the durable-watermark file of a journal directory. Without it a
/// writer does not start: journal tailers (the replicators) would have no limit to stop at and
/// could copy records that are not yet durable.
fn open_durable_file(dir: &Path) -> io::Result<std::fs::File> {
    let path = dir.join(DURABLE_FILE_NAME);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open the durable-watermark file {}: {e}",
                    path.display()
                ),
            )
        })
}

/// Bytes of a torn tail copied or zeroed at a time.
const CUT_PIECE_BYTES: usize = 4 << 20;

/// Copies `[from, to)` of the segment at `path` to `<segment>.cut-at-<from>` (`.1`, `.2`, ... after a first one; synced, and the
/// directory too) before a torn tail is zeroed; returns the copy's path.
fn keep_cut_bytes(path: &Path, from: u64, to: u64) -> io::Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    let source = std::fs::File::open(path)?;
    // Never over an earlier cut at the same offset (a second crash before the first sync).
    let (kept, mut file) = (0u32..)
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".cut-at-{from}"));
            if n > 0 {
                name.push(format!(".{n}"));
            }
            PathBuf::from(name)
        })
        .find_map(|kept| {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&kept)
            {
                Ok(file) => Some(Ok((kept, file))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(e)),
            }
        })
        .unwrap_or_else(|| Err(io::Error::other("no free name for the cut bytes")))?;
    // Copied a piece at a time: a torn tail can be most of a 1 GiB segment (stray bytes near
    // its end), and reading it whole took that much memory at start-up.
    let copy = |file: &mut std::fs::File| -> io::Result<()> {
        let mut piece = vec![0u8; CUT_PIECE_BYTES.min((to - from) as usize)];
        let mut at = from;
        while at < to {
            let n = piece.len().min((to - at) as usize);
            source.read_exact_at(&mut piece[..n], at)?;
            std::io::Write::write_all(file, &piece[..n])?;
            at += n as u64;
        }
        file.sync_all()
    };
    let written = copy(&mut file);
    if let Err(e) = written {
        // A partial copy would pass for the cut bytes on the next attempt's listing.
        drop(file);
        let _ = std::fs::remove_file(&kept);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        storage::fsync_dir(dir)?;
    }
    Ok(kept)
}

/// `keep_cut_bytes`, in the space of the journal's reserve when the disk is full: a torn tail
/// is what a crash leaves, and a crash on a full disk must not keep the server from starting
/// (without a torn tail it starts short of space and refuses new work). The reserve is never
/// written, so removing it loses nothing; the writer allocates it again when it can.
fn keep_cut_bytes_on_a_full_disk(
    dir: &Path,
    path: &Path,
    from: u64,
    to: u64,
) -> io::Result<PathBuf> {
    match keep_cut_bytes(path, from, to) {
        Err(e) if is_no_space(&e) => {
            let reserve = dir.join(RESERVE_FILE_NAME);
            match std::fs::remove_file(&reserve) {
                Ok(()) => {
                    tracing::warn!(reserve = %reserve.display(), error = %e, "no space to keep a torn tail's bytes: the journal's reserve is given up for them");
                    storage::fsync_dir(dir)?;
                    keep_cut_bytes(path, from, to)
                }
                Err(_) => Err(e),
            }
        }
        result => result,
    }
}

/// Zeroes the torn tail `[from, to)` of the open segment `file` (at `path`), whose bytes were
/// kept at `kept`, and syncs it.
fn cut_torn_tail(
    file: &mut dyn storage::SegmentFile,
    path: &Path,
    from: u64,
    to: u64,
    kept: &Path,
) -> io::Result<()> {
    // Zeroed up to the tail's last non-zero byte: the rest is zero already (a whole-segment
    // rewrite would cost up to the segment's size on every start after a crash).
    let zeros = vec![0u8; CUT_PIECE_BYTES.min((to - from) as usize)];
    let mut at = from;
    while at < to {
        let n = zeros.len().min((to - at) as usize);
        file.write_at(at, &zeros[..n])?;
        at += n as u64;
    }
    file.sync_range(from, to - from)?;
    tracing::warn!(file = %path.display(), offset = from, bytes = to - from, kept = %kept.display(), "cut a torn tail past the durable watermark (records never acknowledged, unless a power loss left the watermark file older than what was synced: the cut bytes are kept)");
    Ok(())
}

/// The first sequence of the oldest segment a `--sync none` writer may have left unsynced, if
/// its mark is there (an unreadable mark counts every segment).
fn unsynced_segments(dir: &Path) -> io::Result<Option<u64>> {
    match reader::read_small_file(&dir.join(UNSYNCED_FILE_NAME), format::UNSYNCED_FILE_BYTES) {
        Ok(bytes) => Ok(Some(decode_unsynced(&bytes).unwrap_or_else(|e| {
            tracing::warn!(
                error = e,
                "unreadable unsynced-segments file: every segment is rewritten"
            );
            0
        }))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes segments whose creation was interrupted (still under their temporary name: they
/// never held a record).
fn remove_unfinished_segments(dir: &std::path::Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".wal.tmp"))
        {
            tracing::warn!(file = %path.display(), "removing a segment whose creation was interrupted");
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

impl JournalWriter {
    /// Opens the journal in `config.dir` after recovery: `end` is what `scan` returned.
    /// A torn tail reported in `end` is zeroed and synced before anything new is written.
    pub fn open(
        mut storage: Box<dyn Storage>,
        config: JournalConfig,
        end: &JournalEnd,
    ) -> io::Result<JournalWriter> {
        check_segment_size(config.segment_size_bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        storage::create_dir_all_durable(&config.dir)?;
        remove_unfinished_segments(&config.dir)?;
        let mut segment = None;
        let mut write_offset = 0;
        let mut pending_cut = None;
        if let Some((path, offset)) = &end.segment {
            let mut file = storage.open_segment(path)?;
            if let Some(torn_at) = end.torn_at {
                // The cut bytes are kept beside the segment first: they were never
                // acknowledged if the durable watermark on disk is current, but that file is
                // synced only once a second, so after a power loss it may be stale, and then
                // what looks like a torn tail could hold acknowledged records behind damage.
                let torn_end = end.torn_end.clamp(torn_at, file.size());
                match keep_cut_bytes_on_a_full_disk(&config.dir, path, torn_at, torn_end) {
                    Ok(kept) => cut_torn_tail(file.as_mut(), path, torn_at, torn_end, &kept)?,
                    // No space, and no reserve to give up (a roll-over on the full disk
                    // used it before the crash): the bytes stay where they are, uncut, and
                    // the writer starts short of space, writing nothing until they are kept
                    // (it refused to open, on every start, until space was freed).
                    Err(e) if is_no_space(&e) => {
                        tracing::error!(file = %path.display(), offset = torn_at, bytes = torn_end - torn_at, error = %e, "no space to keep the bytes of a torn tail before cutting it: it stays uncut, and new work is refused (507 journal_full) until they can be kept");
                        pending_cut = Some(PendingCut {
                            path: path.clone(),
                            from: torn_at,
                            to: torn_end,
                        });
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "cannot keep the {} bytes of the torn tail of {} before cutting them: {e}",
                                torn_end - torn_at,
                                path.display()
                            ),
                        ));
                    }
                }
            }
            write_offset = *offset;
            // What recovery found may still be only in the page cache (the previous process
            // crashed before its sync): make it durable before it is published as such. Only
            // the newest segment can hold unsynced records (a segment is synced before the next
            // one is created). Its pages are dirtied first: if the previous process stopped on
            // a failed msync, the kernel may have marked pages clean that never reached the
            // disk, and an msync alone would skip them and "succeed".
            if config.sync != SyncMode::None && write_offset > 0 {
                file.redirty(0, write_offset)?;
                file.sync_range(0, write_offset)?;
            }
            // A newest segment that holds no record and is smaller than configured (cut short
            // by a copy, a restore or by hand, or recovery cut its only records): the first
            // record might not fit, and the roll-over would then need a new segment of this
            // very name, which is never created over an existing one (the engine halted on its
            // first write, at every start). It is allocated to the configured size.
            if write_offset == SEGMENT_HEADER_BYTES as u64
                && file.size() < config.segment_size_bytes
            {
                drop(file);
                storage.grow_segment(path, config.segment_size_bytes)?;
                file = storage.open_segment(path)?;
            }
            segment = Some(file);
            // Older segments are synced at their roll-over, except by a writer that ran with
            // `--sync none`: their tails may still be only in the page cache. The watermark
            // published below covers them, so they are made durable first (an fsync of a clean
            // file writes nothing).
            //
            // An fsync alone is not enough for the segments a `--sync none` writer wrote (the
            // unsynced-segments file names the oldest): if a writeback of theirs failed in the
            // background, the kernel reports it once (to a previous open, which then failed)
            // and may keep the lost pages marked clean, so a later fsync "succeeds" without
            // them. Those segments are dirtied again in full and synced.
            if config.sync != SyncMode::None {
                let unsynced_from = unsynced_segments(&config.dir)?;
                let segments = reader::list_segments(&config.dir).map_err(io::Error::other)?;
                for (first, older) in segments.iter().filter(|(_, p)| p != path) {
                    if unsynced_from.is_some_and(|from| *first >= from) {
                        let mut file = storage.open_segment(older)?;
                        file.redirty(0, file.size())?;
                        file.sync_range(0, file.size())?;
                    } else {
                        storage.sync_file(older)?;
                    }
                }
            }
        }
        let unsynced_file = config.dir.join(UNSYNCED_FILE_NAME);
        if config.sync == SyncMode::None {
            // Before anything is written: the segments from the newest on may now hold records
            // that only the page cache has. A mark left by an earlier `--sync none` writer
            // names an older segment: it stays.
            if !unsynced_file.exists() {
                let from = end
                    .segment
                    .as_ref()
                    .and_then(|(path, _)| path.file_name()?.to_str())
                    .and_then(parse_segment_file_name)
                    .unwrap_or(end.next_seq);
                let file = std::fs::File::create(&unsynced_file)?;
                std::io::Write::write_all(&mut &file, &encode_unsynced(from))?;
                file.sync_all()?;
                storage.sync_dir(&config.dir)?;
            }
        } else {
            // The segments' names too: a segment is created under a temporary name, renamed
            // and then the directory is fsynced, and a process killed (or failing) between the
            // rename and that fsync leaves a segment whose name may not survive a power loss.
            // Records this writer acknowledges in it would go with it.
            storage.sync_dir(&config.dir)?;
            if unsynced_file.exists() {
                std::fs::remove_file(&unsynced_file)?;
                storage.sync_dir(&config.dir)?;
            }
        }
        let durable_file = open_durable_file(&config.dir)?;
        let mut writer = JournalWriter {
            storage,
            config,
            segment,
            write_offset,
            synced_offset: write_offset,
            pending: Vec::with_capacity(PENDING_LIMIT_BYTES + MAX_FRAME_BYTES),
            next_seq: end.next_seq,
            last_crc: end.last_crc,
            durable_seq: end.next_seq - 1,
            last_sync: Instant::now(),
            poisoned: false,
            bytes_written: 0,
            durable_file,
            published_seq: u64::MAX,
            watermark_synced: Instant::now(),
            watermark_synced_seq: end.next_seq - 1,
            reserve: false,
            space_short: false,
            reserve_tried: Instant::now(),
            pending_cut,
        };
        writer.publish_durable()?;
        // The first watermark is made durable, its contents and its name: the file may be new
        // (a fresh directory, one its operator removed), and until then a power loss could
        // take it away or leave it empty. A later start would then judge the journal's tail
        // without it, and pages of an unacknowledged batch that reached the disk after a hole
        // would read as damage: the start refused. From here on the file holds a value this
        // writer published, a true lower bound.
        let path = writer.config.dir.join(DURABLE_FILE_NAME);
        let synced = writer
            .storage
            .sync_small_file(&writer.durable_file, &path)
            .and_then(|()| writer.storage.sync_dir(&writer.config.dir));
        if let Err(e) = synced {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "syncing the durable-watermark file {} failed: {e}",
                    path.display()
                ),
            ));
        }
        Ok(writer)
    }

    /// Writes the durable watermark to `journal/durable` (one `pwrite` of 24 bytes: it is
    /// written only after the records it names are durable, and a stale, lower value is safe
    /// for its readers), made durable at most every `WATERMARK_SYNC_EVERY` unless the writer
    /// syncs nothing (`--sync none`: the file would then outlive the records it names). A
    /// failed write or sync poisons the writer like a failed sync of a segment: recovery
    /// tells a torn tail from damage by this file, so a file left behind for good would let a
    /// later start cut acknowledged records as a torn tail (kept aside, but cut), and nothing
    /// else is acknowledged.
    fn publish_durable(&mut self) -> io::Result<()> {
        if self.published_seq == self.durable_seq {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let bytes = encode_durable(self.durable_seq, self.last_crc);
        if let Err(e) = self.durable_file.write_all_at(&bytes, 0) {
            self.poisoned = true;
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "writing the durable-watermark file {} failed: {e}",
                    self.config.dir.join(DURABLE_FILE_NAME).display()
                ),
            ));
        }
        self.published_seq = self.durable_seq;
        Ok(())
    }

    /// Makes `journal/durable` durable if it changed and `WATERMARK_SYNC_EVERY` has passed
    /// since it last was (never under `--sync none`: the file would then outlive the records it
    /// names). `commit` calls it; the engine calls `commit_deferring_watermark` and this after
    /// the batch's answers (the records are durable already: the sync is housekeeping, and a
    /// cache flush on a slow disk should not delay them). A failed sync poisons the writer.
    pub fn sync_watermark_if_due(&mut self) -> io::Result<()> {
        self.check()?;
        if self.config.sync != SyncMode::None
            && self.watermark_synced_seq != self.published_seq
            && self.watermark_synced.elapsed() >= WATERMARK_SYNC_EVERY
        {
            let path = self.config.dir.join(DURABLE_FILE_NAME);
            if let Err(e) = self.storage.sync_small_file(&self.durable_file, &path) {
                self.poisoned = true;
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "syncing the durable-watermark file {} failed: {e}",
                        path.display()
                    ),
                ));
            }
            self.watermark_synced = Instant::now();
            self.watermark_synced_seq = self.published_seq;
        }
        Ok(())
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Keeps a reserve from now on: one segment's size of allocated disk space
    /// (`journal/reserve`) that a roll-over finding the disk full turns into the new segment
    /// (`space_short`). Allocated here (a whole one from an earlier run is kept, one of another
    /// size is made this writer's size); if it cannot be, the writer starts short of space.
    /// `serve` keeps one; the tools that open a writer only to close it do not.
    pub fn keep_reserve(&mut self) {
        self.reserve = true;
        if self.pending_cut.is_none() {
            self.take_reserve();
        }
    }

    /// True while the writer keeps a reserve and holds none: its current segment's room is
    /// all it is sure of. The engine then executes nothing new (`journal_full`), so that what
    /// it already executed fits in the segment the reserve became, and nothing is lost or
    /// halted for want of space. Cleared by a `commit` once the reserve can be allocated again
    /// (tried at most every `RESERVE_RETRY`).
    pub fn space_short(&self) -> bool {
        self.space_short || self.pending_cut.is_some()
    }

    /// Keeps and cuts a torn tail that `open` could not keep for want of space; true once
    /// there is none left to cut.
    fn finish_cut(&mut self) -> io::Result<bool> {
        let Some(cut) = &self.pending_cut else {
            return Ok(true);
        };
        self.reserve_tried = Instant::now();
        let kept = match keep_cut_bytes(&cut.path, cut.from, cut.to) {
            Ok(kept) => kept,
            Err(e) if is_no_space(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        let segment = self
            .segment
            .as_mut()
            .ok_or_else(|| io::Error::other("a torn tail to cut, and no open segment"))?;
        cut_torn_tail(segment.as_mut(), &cut.path, cut.from, cut.to, &kept)?;
        tracing::info!(file = %cut.path.display(), "the torn tail's bytes are kept and cut: new work is taken again once the reserve is allocated");
        self.pending_cut = None;
        Ok(true)
    }

    /// Allocates the reserve (a no-op for one already whole); `space_short` says whether it is
    /// held.
    fn take_reserve(&mut self) {
        let path = self.config.dir.join(RESERVE_FILE_NAME);
        self.reserve_tried = Instant::now();
        match self
            .storage
            .reserve_space(&path, self.config.segment_size_bytes)
        {
            Ok(()) => {
                if self.space_short {
                    tracing::info!(file = %path.display(), "the journal's reserve is allocated again: new work is taken again");
                }
                self.space_short = false;
            }
            Err(e) => {
                if !self.space_short {
                    tracing::error!(file = %path.display(), error = %e, "the journal cannot allocate its reserve (one segment of disk space): new work is refused (507 journal_full) until it can");
                }
                self.space_short = true;
            }
        }
    }

    /// The directory this writer appends to.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn check(&self) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::other(
                "journal stopped after an earlier write or sync failure",
            ));
        }
        Ok(())
    }

    /// Frames `record` and buffers it. Durable only after `commit`.
    pub fn append(&mut self, record: &CommandRecord) -> io::Result<()> {
        self.check()?;
        // Never over a torn tail whose bytes are not kept (the engine takes no new work
        // meanwhile: `space_short`).
        if self.pending_cut.is_some() {
            if !self.finish_cut()? {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            if self.reserve {
                self.take_reserve();
            }
        }
        assert_eq!(
            record.first_seq, self.next_seq,
            "journal append out of sequence"
        );
        assert!(!record.replayed && record.event_count > 0);
        let frame_len = FRAME_HEADER_BYTES + payload_len(record);
        // The open segment's real size, not the configured one: a segment reopened after a
        // restart may have been created with another size.
        let segment_full = self.segment.as_ref().is_none_or(|segment| {
            self.write_offset + (self.pending.len() + frame_len) as u64 > segment.size()
        });
        if segment_full {
            self.roll_segment(record.first_seq)?;
        }
        let start = self.pending.len();
        self.pending.resize(start + frame_len, 0);
        encode_record(record, &mut self.pending[start + FRAME_HEADER_BYTES..]);
        self.last_crc = seal_frame(&mut self.pending[start..], record.first_seq, self.last_crc);
        self.next_seq = record.next_seq();
        if self.pending.len() >= PENDING_LIMIT_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let segment = self
            .segment
            .as_mut()
            .expect("a segment is open when bytes are pending");
        if let Err(e) = segment.write_at(self.write_offset, &self.pending) {
            self.poisoned = true;
            return Err(e);
        }
        self.write_offset += self.pending.len() as u64;
        self.bytes_written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn sync_segment(&mut self) -> io::Result<()> {
        if let Some(segment) = self.segment.as_mut() {
            let len = self.write_offset - self.synced_offset;
            if let Err(e) = segment.sync_range(self.synced_offset, len) {
                // fsyncgate: after a failed sync the kernel may have dropped the dirty pages, so a
                // retry could "succeed" without the data. Stop for good.
                self.poisoned = true;
                return Err(e);
            }
            self.synced_offset = self.write_offset;
        }
        Ok(())
    }

    fn roll_segment(&mut self, first_seq: u64) -> io::Result<()> {
        self.write_pending()?;
        if self.config.sync != SyncMode::None {
            self.sync_segment()?;
        }
        let path = self.config.dir.join(segment_file_name(first_seq));
        let header =
            encode_segment_header(first_seq, self.config.segment_size_bytes, self.last_crc);
        let size = self.config.segment_size_bytes;
        let created = match self.storage.create_segment(&path, size, &header) {
            Err(e) if is_no_space(&e) && self.reserve && !self.space_short => {
                // The disk is full: the reserve becomes this segment, and the engine takes no
                // new work (`space_short`) until a reserve can be allocated again.
                let reserve = self.config.dir.join(RESERVE_FILE_NAME);
                tracing::error!(error = %e, "the disk holding the journal is full: the reserve becomes the next segment, and new work is refused (507 journal_full) until a segment's worth of space is free");
                self.space_short = true;
                self.reserve_tried = Instant::now();
                self.storage
                    .segment_from_reserve(&reserve, &path, size, &header)
            }
            other => other,
        };
        let segment = created.inspect_err(|_| {
            self.poisoned = true;
        })?;
        self.segment = Some(segment);
        self.write_offset = SEGMENT_HEADER_BYTES as u64;
        self.synced_offset = self.write_offset;
        Ok(())
    }

    /// Ends a batch: copies buffered frames into the segment and syncs per the sync mode.
    /// Returns the highest durable sequence number.
    pub fn commit(&mut self) -> io::Result<u64> {
        let durable = self.commit_deferring_watermark()?;
        self.sync_watermark_if_due()?;
        Ok(durable)
    }

    /// `commit`, leaving the watermark file's periodic sync to `sync_watermark_if_due`.
    pub fn commit_deferring_watermark(&mut self) -> io::Result<u64> {
        self.check()?;
        self.write_pending()?;
        match self.config.sync {
            SyncMode::Batch => self.sync_segment()?,
            // Nothing written since the last sync (a batch of replays, say): nothing to wait
            // for.
            SyncMode::Interval(_) if self.write_offset == self.synced_offset => {}
            SyncMode::Interval(interval) => {
                let since = self.last_sync.elapsed();
                if since < interval {
                    std::thread::sleep(interval - since);
                }
                self.sync_segment()?;
                self.last_sync = Instant::now();
            }
            SyncMode::None => {}
        }
        self.durable_seq = self.next_seq - 1;
        // `last_crc` is the frame checksum of the record ending at `durable_seq`: everything
        // appended is committed here.
        self.publish_durable()?;
        if self.pending_cut.is_some() {
            if self.reserve_tried.elapsed() >= RESERVE_RETRY && self.finish_cut()? && self.reserve {
                self.take_reserve();
            }
        } else if self.reserve && self.space_short && self.reserve_tried.elapsed() >= RESERVE_RETRY
        {
            self.take_reserve();
        }
        Ok(self.durable_seq)
    }
}

/// Directory layout under a data directory.
pub fn journal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("journal")
}

/// The journal directory of `data_dir`, which must exist: for the tools that read a journal
/// (replay, snapshot, replicate, reconcile), where a mistyped path would otherwise read as an
/// empty, "verified" ledger.
pub fn existing_journal_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let journal = journal_dir(data_dir);
    anyhow::ensure!(
        journal.is_dir(),
        "there is no journal at {} (a server never ran with this data directory, or the path is \
         wrong)",
        journal.display()
    );
    Ok(journal)
}

pub fn snapshot_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}
