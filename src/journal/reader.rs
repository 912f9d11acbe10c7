//! Reading the journal back: verify every frame and the hash chain, cut a torn tail, refuse
//! corruption inside the committed log.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::core::CommandRecord;
use crate::core::codec::decode_record;
use crate::journal::format::{
    FRAME_HEADER_BYTES, FrameError, MAX_FRAME_BYTES, SEGMENT_HEADER_BYTES, check_frame,
    decode_segment_header, parse_segment_file_name,
};

/// Where and why the journal is unreadable. Never silently truncated.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal corrupt in {file} at byte offset {offset}, sequence {seq}: {reason}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        seq: u64,
        reason: String,
    },
    /// (Not a `source` field: the message holds the OS error already, and an error chain
    /// printed with its causes showed it twice.)
    #[error("journal I/O error on {file}: {error}")]
    Io {
        file: PathBuf,
        error: std::io::Error,
    },
    /// A record that frames, checksums and decodes, but that the reader's visitor refused
    /// (it does not apply to the state replayed so far, a checkpoint's hash differs, ...):
    /// the journal's content, not its bytes, is wrong there. `at` is the record's segment file
    /// and byte offset, when known.
    #[error("{}sequence {seq} does not replay: {reason}", located(.at))]
    Visitor {
        seq: u64,
        reason: String,
        at: Option<(PathBuf, u64)>,
    },
}

fn located(at: &Option<(PathBuf, u64)>) -> String {
    at.as_ref().map_or(String::new(), |(file, offset)| {
        format!(
            "journal record in {} at byte offset {offset}, ",
            file.display()
        )
    })
}

/// Where the record starting at `seq` is: its segment file and byte offset, read from the
/// segment that holds it; `None` if the journal cannot be read to it or no record starts there.
/// For errors only (a visitor's refusal found on another thread, which knows the sequence).
pub fn record_position(dir: &Path, seq: u64) -> Option<(PathBuf, u64)> {
    let mut seen = None;
    match scan_inner(
        dir,
        seq,
        |record| {
            if record.first_seq == seq {
                Err(String::new())
            } else {
                Ok(())
            }
        },
        &mut seen,
    ) {
        Err(JournalError::Visitor { at, .. }) => at,
        _ => None,
    }
}

/// The journal's durable watermark: the last sequence its file names as synced (so possibly
/// acknowledged), and the frame crc of the record that ends there. `None` when the file is
/// not there (a journal from before it existed, or one its operator removed) or empty (created
/// by a writer that crashed before its first write, which is synced before anything is
/// acknowledged): the checks it feeds are then skipped. A file that does not decode is
/// damaged (the writer rewrites its 24 bytes in place, within one sector): an error, never a
/// skipped check, since recovery would otherwise cut acknowledged records as a torn tail. A
/// read torn by a concurrent rewrite is read again first. Any other failure to read it is an
/// error too: a disk or permission error must not turn those checks off.
pub fn read_durable_watermark(dir: &Path) -> Result<Option<(u64, u32)>, JournalError> {
    let path = dir.join(crate::journal::format::DURABLE_FILE_NAME);
    let mut reads = 0;
    loop {
        let bytes = match read_small_file(&path, crate::journal::format::DURABLE_FILE_BYTES) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(JournalError::Io { file: path, error }),
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        match crate::journal::format::decode_durable(&bytes) {
            Ok(watermark) => return Ok(Some(watermark)),
            Err(_) if reads < 4 => {
                reads += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(JournalError::Corrupt {
                    reason: format!(
                        "the durable-watermark file is damaged ({e}): without it, records that \
                         may have been acknowledged cannot be told from a torn tail. Restore it \
                         with the journal it came with; if the journal is known to be whole, \
                         remove {} (nothing is then checked against it)",
                        path.display()
                    ),
                    file: path,
                    offset: 0,
                    seq: 0,
                });
            }
        }
    }
}

/// The sequence of `read_durable_watermark`.
pub fn durable_watermark(dir: &Path) -> Result<Option<u64>, JournalError> {
    Ok(read_durable_watermark(dir)?.map(|(seq, _)| seq))
}

/// The bytes of a small fixed-size file (`size` bytes when intact), read with a bound: at most
/// twice `size`, whatever is there (a device or a huge file is not read whole; what is read is
/// then refused by its decoder).
pub(crate) fn read_small_file(path: &Path, size: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)?
        .take(2 * size as u64)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Where the valid journal ends: the writer continues from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEnd {
    /// The newest segment and the byte offset right after its last valid record.
    pub segment: Option<(PathBuf, u64)>,
    pub next_seq: u64,
    pub last_crc: u32,
    /// Set when a torn tail was found and must be cut: the offset of the first bad byte.
    pub torn_at: Option<u64>,
    /// With `torn_at`: the offset right after the tail's last non-zero byte (the segment is
    /// all zeros from there on, so the cut need not write further).
    pub torn_end: u64,
    /// The journal's chain value at the scan's `from_seq` (the frame checksum of the record that
    /// ends right before it, which the record starting there chains to), when a record starts
    /// exactly there or the journal ends exactly there; `None` otherwise.
    pub chain_at_from: Option<u32>,
}

impl JournalEnd {
    /// The end of a journal with no record yet: the writer starts it at sequence 1.
    pub fn empty() -> JournalEnd {
        JournalEnd {
            segment: None,
            next_seq: 1,
            last_crc: 0,
            torn_at: None,
            torn_end: 0,
            chain_at_from: None,
        }
    }
}

/// Lists the segment files of `dir`, sorted by their first sequence number.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let io = |error| JournalError::Io {
        file: dir.to_path_buf(),
        error,
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(parse_segment_file_name) {
            out.push((seq, entry.path()));
        } else if name
            .as_encoded_bytes()
            .to_ascii_lowercase()
            .ends_with(b".wal")
        {
            // A segment renamed (`1.wal`, `….WAL`) would otherwise be passed over in silence,
            // and a journal of one such file read as an empty, "verified" one.
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is named like a segment but is not one (segments are named with 20 \
                     digits, as 00000000000000000001.wal): rename it back, or move it out of \
                     the journal directory",
                    entry.path().display()
                ),
            )));
        }
    }
    out.sort();
    Ok(out)
}

/// A guess, for sizing tables before a replay, of how many records the journal in `dir`
/// holds from `from_seq` on: the bytes of the segments that may hold them at 112 bytes per
/// record, a transfer's. Journals of mostly transfers come out within a few percent (the
/// 50 M-transfer journal of `tools/startup-bench`: 51.6 M for 51.8 M records); smaller records
/// make it low, which costs a table growth. It should not come out high: tables are sized in
/// powers of two, and a guess a little too high can double one for good. The newest segment
/// is preallocated and mostly unwritten, so its share is also bounded by half the events the
/// durable watermark file counts in it (a transfer's two), and the whole by all the events
/// from `from_seq` (every record has at least one). At most `MAX_ESTIMATE`.
/// Only a size hint: nothing depends on it being right, and a wrong guess costs memory or a
/// table growth, not a result.
pub fn estimate_records(dir: &Path, from_seq: u64) -> usize {
    const BYTES_PER_RECORD: u64 = 112;
    /// The ledger indexes remembered ids with `u32`.
    const MAX_ESTIMATE: u64 = 1 << 31;
    let segments = list_segments(dir).unwrap_or_default();
    let durable_seq = durable_watermark(dir).ok().flatten();
    // Events at or after `start` up to the durable watermark (unbounded without one).
    let durable_events_from =
        |start: u64| durable_seq.map_or(u64::MAX, |d| d.saturating_add(1).saturating_sub(start));
    let mut estimate = 0u64;
    for (i, (first_seq, path)) in segments.iter().enumerate() {
        let next = segments.get(i + 1).map(|(next, _)| *next);
        // A segment ends where the next begins; skip those that end before `from_seq`.
        if next.is_some_and(|next| next <= from_seq) {
            continue;
        }
        let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        let mut records = bytes / BYTES_PER_RECORD;
        if next.is_none() {
            // Counted as transfers (two events each), like the bytes.
            records = records.min(durable_events_from((*first_seq).max(from_seq)) / 2);
        }
        estimate = estimate.saturating_add(records);
    }
    let estimate = estimate
        .min(durable_events_from(from_seq))
        .min(MAX_ESTIMATE);
    usize::try_from(estimate).unwrap_or(usize::MAX)
}

/// Looks for any valid frame with a sequence at or beyond `expected` after `from`. If there is
/// one, the bad bytes at `from` are not a torn tail but a hole in the committed log.
fn valid_frame_after(
    bytes: &mut impl SegmentBytes,
    from: usize,
    expected: u64,
) -> std::io::Result<bool> {
    let mut at = from + 8;
    while at + FRAME_HEADER_BYTES <= bytes.len() {
        if let Ok(frame) = check_frame(bytes.at(at, MAX_FRAME_BYTES)?)
            && frame.sequence >= expected
        {
            return Ok(true);
        }
        at += 8;
    }
    Ok(false)
}

/// Checks the segments that a scan from `from_seq` does not open (those before the last one
/// that begins at or before it) by their headers alone: the oldest segment begins at sequence
/// 1 (the history is whole from its start), and each header decodes and names the sequence in
/// its file name. Reads one header per segment. Whether the segments follow one another without
/// a gap only a read of their records can tell.
pub fn check_segment_headers(dir: &Path, from_seq: u64) -> Result<(), JournalError> {
    use std::os::unix::fs::FileExt;
    let segments = list_segments(dir)?;
    let Some((oldest, oldest_path)) = segments.first() else {
        return Ok(());
    };
    if *oldest != 1 {
        return Err(JournalError::Corrupt {
            file: oldest_path.clone(),
            offset: 0,
            seq: *oldest,
            reason: format!(
                "the oldest segment begins at sequence {oldest}, not 1: the segments before it \
                 are missing (the journal is the whole history; restore them)"
            ),
        });
    }
    let start = segments
        .iter()
        .rposition(|(first, _)| *first <= from_seq)
        .unwrap_or(0);
    for (named_first, path) in &segments[..start] {
        let io = |error| JournalError::Io {
            file: path.clone(),
            error,
        };
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        let file = File::open(path).map_err(io)?;
        let read = file.read_at(&mut header, 0).map_err(io)?;
        let decoded = decode_segment_header(&header[..read]).and_then(|h| {
            if h.first_seq == *named_first {
                Ok(h)
            } else {
                Err("segment header disagrees with its file name")
            }
        });
        if let Err(reason) = decoded {
            return Err(JournalError::Corrupt {
                file: path.clone(),
                offset: 0,
                seq: *named_first,
                reason: reason.to_string(),
            });
        }
    }
    Ok(())
}

/// Scans every record from `from_seq` on (records before it are verified but not visited),
/// calling `visit` for each. Verifies frames, sequence continuity and the checksum chain.
///
/// A bad frame in the newest segment is a torn tail (the scan stops there and reports it in
/// `JournalEnd::torn_at`) when no valid frame follows it, or when it starts past the durable
/// watermark: records past the watermark were never synced, so never acknowledged, and a crash
/// can leave any of their pages on the disk without the ones before (writeback has no order).
/// Any other bad frame is `Corrupt`.
pub fn scan(
    dir: &Path,
    from_seq: u64,
    visit: impl FnMut(&CommandRecord) -> Result<(), String>,
) -> Result<JournalEnd, JournalError> {
    scan_inner(dir, from_seq, visit, &mut None)
}

/// The journal's chain value at `seq`, read before anything is applied there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainAt {
    /// A record starts at `seq` (or the journal ends exactly there): the frame checksum of the
    /// record before it.
    Boundary(u32),
    /// `seq` falls inside a record.
    InsideRecord,
    /// The journal ends before `seq`.
    Beyond,
}

/// The journal's chain value at `seq`: verifies the segment that holds it up to there and
/// stops (a snapshot's chain value is checked with it before the snapshot is built on).
pub fn chain_at(dir: &Path, seq: u64) -> Result<ChainAt, JournalError> {
    let mut seen = None;
    match scan_inner(dir, seq, |_| Err(String::new()), &mut seen) {
        Ok(end) => Ok(match end.chain_at_from {
            Some(chain) => ChainAt::Boundary(chain),
            None if end.next_seq < seq => ChainAt::Beyond,
            None => ChainAt::InsideRecord,
        }),
        Err(JournalError::Visitor { .. }) => Ok(seen
            .flatten()
            .map_or(ChainAt::InsideRecord, ChainAt::Boundary)),
        Err(e) => Err(e),
    }
}

/// `scan`; `chain_seen` is set, as the scan passes `from_seq`, to what `chain_at_from` will
/// hold (so that a caller whose visitor stops the scan still gets it).
fn scan_inner(
    dir: &Path,
    from_seq: u64,
    mut visit: impl FnMut(&CommandRecord) -> Result<(), String>,
    chain_seen: &mut Option<Option<u32>>,
) -> Result<JournalEnd, JournalError> {
    let segments = list_segments(dir)?;
    let mut scan = Scan {
        from_seq,
        durable: durable_watermark(dir)?,
        end: JournalEnd::empty(),
        passed_from: false,
        chain_seen,
    };
    // Start at the last segment that begins at or before `from_seq`; the chain is verified from
    // that segment's header on.
    let start = segments
        .iter()
        .rposition(|(first, _)| *first <= from_seq)
        .unwrap_or(0);
    for (position, (named_first, path)) in segments.iter().enumerate().skip(start) {
        let io = |error| JournalError::Io {
            file: path.clone(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        let segment = SegmentAt {
            path,
            named_first: *named_first,
            first: position == start,
            newest: position + 1 == segments.len(),
        };
        // Only the newest segment can be written while a scan runs (the writer stores into its
        // current segment, and creates the next only after it is done with this one), so only
        // it is read with `pread` into a buffer: no mapping that another thread or process
        // stores into is ever read. The sealed segments before it are mapped.
        let offset = if segment.newest {
            scan.segment(
                &mut ReadSegment::new(file).map_err(io)?,
                &segment,
                &mut visit,
            )?
        } else {
            scan.segment(
                &mut MappedSegment::new(&file).map_err(io)?,
                &segment,
                &mut visit,
            )?
        };
        scan.end.segment = Some((path.clone(), offset as u64));
    }
    if !scan.passed_from && scan.end.next_seq == from_seq {
        scan.end.chain_at_from = Some(scan.end.last_crc);
    }
    Ok(scan.end)
}

/// The bytes of one segment file as a scan reads them, front to back.
trait SegmentBytes {
    /// The file's length.
    fn len(&self) -> usize;
    /// The bytes from `offset` on: at least `want` of them, or all up to the end if fewer are
    /// left (`offset <= len`).
    fn at(&mut self, offset: usize, want: usize) -> std::io::Result<&[u8]>;
    /// The offset right after the last non-zero byte at or after `from`, if there is one.
    fn nonzero_end(&mut self, from: usize) -> std::io::Result<Option<usize>>;
}

/// A sealed segment, mapped: nothing writes to it any more. Its pages are populated a window
/// ahead of the reads (`MADV_POPULATE_READ`), so that a page the kernel cannot read (an I/O
/// error, a file cut shorter since it was mapped) is an error naming the file, not a SIGBUS at
/// the scan's first touch of it. (As for snapshots, `journal::snapshot::populate`: a page
/// reclaimed and read again later can still fail that way, and a kernel before 5.14 has no
/// `MADV_POPULATE_READ`: `EINVAL`, and the pages are faulted in as they are read.)
struct MappedSegment {
    map: Mmap,
    /// The bytes before this offset are populated.
    populated: usize,
}

/// Bytes a sealed segment's mapping is populated ahead, one `madvise` each.
const POPULATE_WINDOW_BYTES: usize = 4 << 20;

impl MappedSegment {
    fn new(file: &File) -> std::io::Result<MappedSegment> {
        // SAFETY: the scan maps only sealed segments, those with a newer segment after them:
        // the one writer of a data directory stores only into its newest segment and creates
        // the next after its last store into this one, and nothing truncates a segment file,
        // so the mapped bytes do not go away while the mapping lives and do not change.
        // (Recovery cuts a torn tail only in the newest segment, and runs with no other reader.
        // One store does reach sealed segments: a writer opening after a `--sync none` run
        // stores every page's first byte back unchanged into the segments marked unsynced, to
        // dirty them; that happens before this process reads any, and a reader in another
        // process then sees the same bytes.)
        let map = unsafe { Mmap::map(file) }?;
        // Read front to back: let the kernel read ahead and drop pages behind.
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(MappedSegment { map, populated: 0 })
    }

    /// Populates the mapping up to at least `end` (a window further, within the file).
    fn populate_to(&mut self, end: usize) -> std::io::Result<()> {
        if end <= self.populated {
            return Ok(());
        }
        let to = end
            .max(self.populated + POPULATE_WINDOW_BYTES)
            .min(self.map.len());
        let from = self.populated;
        crate::journal::storage::populated(
            self.map
                .advise_range(memmap2::Advice::PopulateRead, from, to - from),
            || format!("the pages at offsets {from} to {to}"),
        )?;
        self.populated = to;
        Ok(())
    }
}

impl SegmentBytes for MappedSegment {
    fn len(&self) -> usize {
        self.map.len()
    }

    #[inline]
    fn at(&mut self, offset: usize, want: usize) -> std::io::Result<&[u8]> {
        self.populate_to(offset.saturating_add(want).min(self.map.len()))?;
        Ok(&self.map[offset..])
    }

    fn nonzero_end(&mut self, from: usize) -> std::io::Result<Option<usize>> {
        self.populate_to(self.map.len())?;
        Ok(self.map[from..]
            .iter()
            .rposition(|b| *b != 0)
            .map(|i| from + i + 1))
    }
}

/// The newest segment, which a writer may be storing into while it is read: copied out with
/// positioned reads, a window at a time. A frame read while it is being written fails its
/// checksum and reads as not written yet.
struct ReadSegment {
    file: File,
    len: usize,
    buffer: Vec<u8>,
    /// The file offset of `buffer[0]`.
    start: usize,
}

/// Bytes per positioned read of the newest segment.
const READ_WINDOW_BYTES: usize = 1 << 20;

impl ReadSegment {
    fn new(file: File) -> std::io::Result<ReadSegment> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("segment file too large"))?;
        Ok(ReadSegment {
            file,
            len,
            buffer: Vec::new(),
            start: 0,
        })
    }

    /// Reads `len - offset` bytes, at most a window, at `offset` into the buffer.
    fn fill(&mut self, offset: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let n = (self.len - offset).min(READ_WINDOW_BYTES);
        self.buffer.resize(n, 0);
        self.start = offset;
        if let Err(e) = self.file.read_exact_at(&mut self.buffer, offset as u64) {
            self.buffer.clear();
            return Err(e);
        }
        Ok(())
    }
}

impl SegmentBytes for ReadSegment {
    fn len(&self) -> usize {
        self.len
    }

    fn at(&mut self, offset: usize, want: usize) -> std::io::Result<&[u8]> {
        let need = want.min(self.len - offset);
        let held = offset >= self.start && offset + need <= self.start + self.buffer.len();
        if !held {
            self.fill(offset)?;
        }
        Ok(&self.buffer[offset - self.start..])
    }

    fn nonzero_end(&mut self, from: usize) -> std::io::Result<Option<usize>> {
        // From the end backwards: the unwritten rest of a segment is zeros.
        let mut window_end = self.len;
        while window_end > from {
            let window_start = window_end.saturating_sub(READ_WINDOW_BYTES).max(from);
            let bytes = self.at(window_start, window_end - window_start)?;
            if let Some(i) = bytes[..window_end - window_start]
                .iter()
                .rposition(|b| *b != 0)
            {
                return Ok(Some(window_start + i + 1));
            }
            window_end = window_start;
        }
        Ok(None)
    }
}

/// Which segment a scan is reading.
struct SegmentAt<'a> {
    path: &'a PathBuf,
    named_first: u64,
    /// The first segment this scan reads: its header starts the chain.
    first: bool,
    /// The newest segment: bad bytes at its end can be a torn tail.
    newest: bool,
}

/// A scan's state from one segment to the next.
struct Scan<'a> {
    from_seq: u64,
    durable: Option<u64>,
    end: JournalEnd,
    passed_from: bool,
    chain_seen: &'a mut Option<Option<u32>>,
}

impl Scan<'_> {
    /// Verifies and visits the records of one segment; returns the offset right after its last
    /// valid record.
    fn segment(
        &mut self,
        bytes: &mut impl SegmentBytes,
        segment: &SegmentAt,
        visit: &mut impl FnMut(&CommandRecord) -> Result<(), String>,
    ) -> Result<usize, JournalError> {
        let path = segment.path;
        let corrupt = |offset: u64, seq: u64, reason: &str| JournalError::Corrupt {
            file: path.clone(),
            offset,
            seq,
            reason: reason.to_string(),
        };
        let io = |error| JournalError::Io {
            file: path.clone(),
            error,
        };
        let header = decode_segment_header(bytes.at(0, SEGMENT_HEADER_BYTES).map_err(io)?)
            .map_err(|r| corrupt(0, segment.named_first, r))?;
        if header.first_seq != segment.named_first {
            return Err(corrupt(
                0,
                header.first_seq,
                "segment header disagrees with its file name",
            ));
        }
        let end = &mut self.end;
        if segment.first {
            end.next_seq = header.first_seq;
            end.last_crc = header.prev_crc;
        } else if header.first_seq != end.next_seq || header.prev_crc != end.last_crc {
            // Name where the previous segment's records end: a segment cut short (or zeroed
            // from some offset to its end) shows here first, and is the one to look at.
            let previous = match &end.segment {
                Some((file, valid_end)) => format!(
                    "; the previous segment {} ends at sequence {} (its records end at byte \
                     offset {valid_end}), this one starts at {}",
                    file.display(),
                    end.next_seq.saturating_sub(1),
                    header.first_seq
                ),
                None => String::new(),
            };
            return Err(corrupt(
                0,
                header.first_seq,
                &format!(
                    "segment does not continue the previous one (gap or broken chain){previous}"
                ),
            ));
        }
        let len = bytes.len();
        let mut offset = SEGMENT_HEADER_BYTES;
        loop {
            // Slack at the end of a segment too small for a frame header is unwritten space.
            let frame_bytes = if len - offset < FRAME_HEADER_BYTES {
                None
            } else {
                Some(bytes.at(offset, MAX_FRAME_BYTES).map_err(io)?)
            };
            let checked = frame_bytes.map_or(Err(FrameError::End), check_frame);
            match checked {
                Ok(frame) => {
                    if frame.sequence != end.next_seq {
                        return Err(corrupt(
                            offset as u64,
                            frame.sequence,
                            "sequence gap or reorder",
                        ));
                    }
                    if frame.prev_crc != end.last_crc {
                        return Err(corrupt(
                            offset as u64,
                            frame.sequence,
                            "checksum chain broken",
                        ));
                    }
                    let frame_bytes = frame_bytes.unwrap_or_default();
                    let payload = &frame_bytes[FRAME_HEADER_BYTES..frame.length];
                    let record = decode_record(frame.sequence, payload).map_err(|e| {
                        corrupt(
                            offset as u64,
                            frame.sequence,
                            &format!("undecodable payload: {e}"),
                        )
                    })?;
                    if record.first_seq >= self.from_seq && !self.passed_from {
                        self.passed_from = true;
                        end.chain_at_from =
                            (record.first_seq == self.from_seq).then_some(frame.prev_crc);
                        *self.chain_seen = Some(end.chain_at_from);
                    }
                    if record.first_seq >= self.from_seq {
                        visit(&record).map_err(|reason| JournalError::Visitor {
                            seq: record.first_seq,
                            reason,
                            at: Some((path.clone(), offset as u64)),
                        })?;
                    }
                    end.next_seq = record.next_seq();
                    end.last_crc = frame.crc;
                    offset += frame.length;
                }
                Err(FrameError::End) => {
                    // Unwritten space. In the newest segment, anything non-zero after it is a
                    // torn write of records that were never acknowledged. A sealed segment was
                    // left only when its next record did not fit: a record after unwritten
                    // space there is a hole in the committed log (zeroed pages), reported
                    // here rather than as the next segment's gap.
                    if !segment.newest {
                        if bytes.nonzero_end(offset).map_err(io)?.is_some()
                            && valid_frame_after(bytes, offset, end.next_seq).map_err(io)?
                        {
                            return Err(corrupt(
                                offset as u64,
                                end.next_seq,
                                "zeroed frame inside the committed log (a sealed segment)",
                            ));
                        }
                        break;
                    }
                    let past_watermark = self.durable.is_some_and(|d| end.next_seq > d);
                    if !past_watermark
                        && valid_frame_after(bytes, offset, end.next_seq).map_err(io)?
                    {
                        return Err(corrupt(
                            offset as u64,
                            end.next_seq,
                            "zeroed frame inside the committed log",
                        ));
                    }
                    if let Some(nonzero_end) = bytes.nonzero_end(offset).map_err(io)? {
                        end.torn_at = Some(offset as u64);
                        end.torn_end = nonzero_end as u64;
                    }
                    break;
                }
                Err(error) => {
                    let past_watermark = self.durable.is_some_and(|d| end.next_seq > d);
                    if segment.newest
                        && (past_watermark
                            || !valid_frame_after(bytes, offset, end.next_seq).map_err(io)?)
                    {
                        // A bad frame starts with a non-zero byte, so there is a last one.
                        let nonzero_end = bytes.nonzero_end(offset).map_err(io)?;
                        end.torn_at = Some(offset as u64);
                        end.torn_end = nonzero_end.unwrap_or(offset + 1) as u64;
                        break;
                    }
                    let reason = match error {
                        FrameError::BadChecksum => "checksum mismatch",
                        FrameError::BadLength => "impossible frame length",
                        FrameError::BadVersion => "unknown frame version",
                        FrameError::End => "end",
                    };
                    return Err(corrupt(offset as u64, end.next_seq, reason));
                }
            }
        }
        Ok(offset)
    }
}

/// Records per batch handed from the reading thread to the visiting thread.
const PIPELINE_BATCH: usize = 4096;

/// `scan`, with the frames read, checksummed and decoded on a second thread while the calling
/// thread visits the records, in batches. `visit` sees exactly the records `scan` would show it,
/// in the same order, and the result is the same: records before a corruption are visited,
/// then the corruption is reported; a visitor error stops the reading thread.
pub fn scan_pipelined(
    dir: &Path,
    from_seq: u64,
    mut visit: impl FnMut(&CommandRecord) -> Result<(), String>,
) -> Result<JournalEnd, JournalError> {
    scan_pipelined_batches(dir, from_seq, |batch| {
        for record in batch {
            visit(record).map_err(|reason| (record.first_seq, reason))?;
        }
        Ok(())
    })
}

/// `scan_pipelined`, handing the visitor whole batches (up to `PIPELINE_BATCH` records, in
/// order), so that it can look ahead within a batch (prefetch the memory of records it will
/// apply soon) without copying records out first. A visitor error names the sequence of the
/// record it failed at; it stops the scan, and the records after it are not visited.
pub fn scan_pipelined_batches(
    dir: &Path,
    from_seq: u64,
    mut visit_batch: impl FnMut(&[CommandRecord]) -> Result<(), (u64, String)>,
) -> Result<JournalEnd, JournalError> {
    use std::sync::mpsc::{channel, sync_channel};
    let (full_sender, full) = sync_channel::<Vec<CommandRecord>>(4);
    let (empty_sender, empty) = channel::<Vec<CommandRecord>>();
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("wallet-journal-reader".into())
            .spawn_scoped(scope, move || {
                let mut batch = Vec::with_capacity(PIPELINE_BATCH);
                let result = scan(dir, from_seq, |record| {
                    batch.push(*record);
                    if batch.len() == PIPELINE_BATCH {
                        let next = empty
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(PIPELINE_BATCH));
                        full_sender
                            .send(std::mem::replace(&mut batch, next))
                            .map_err(|_| "the visitor stopped".to_string())?;
                    }
                    Ok(())
                });
                if !batch.is_empty() {
                    let _ = full_sender.send(batch);
                }
                result
            })
            .map_err(|error| JournalError::Io {
                file: dir.to_path_buf(),
                error,
            })?;
        let mut failure = None;
        for mut batch in full.iter() {
            if let Err((seq, reason)) = visit_batch(&batch) {
                // The reading thread knows where each record is; this one only its sequence.
                failure = Some(JournalError::Visitor {
                    seq,
                    reason,
                    at: record_position(dir, seq),
                });
                break;
            }
            batch.clear();
            let _ = empty_sender.send(batch);
        }
        // Dropping the receiving end makes a blocked reader's next send fail, so it stops.
        drop(full);
        let scanned = reader.join().unwrap_or_else(|_| {
            Err(JournalError::Visitor {
                seq: 0,
                reason: "the journal reader thread panicked".into(),
                at: None,
            })
        });
        match failure {
            Some(error) => Err(error),
            None => scanned,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{MappedSegment, SegmentBytes};

    /// A sealed segment whose file was cut shorter after it was mapped: reading past the new
    /// end is an error, not a SIGBUS that kills the process.
    #[test]
    fn a_mapped_segment_whose_pages_cannot_be_read_is_an_error_not_a_sigbus() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("segment");
        std::fs::write(&path, vec![7u8; 64 << 10]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let mut segment = MappedSegment::new(&file).expect("map");
        // Before Linux 5.14 there is no MADV_POPULATE_READ (EINVAL): the check cannot work,
        // and the read below would be the SIGBUS it guards against.
        if let Err(e) = segment.map.advise(memmap2::Advice::PopulateRead)
            && e.raw_os_error() == Some(libc::EINVAL)
        {
            eprintln!("skipped: this kernel has no MADV_POPULATE_READ");
            return;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing")
            .set_len(4096)
            .expect("truncate");
        // The mapping still spans 64 KiB; its pages past 4 KiB are gone.
        let error = segment
            .at(32 << 10, 100)
            .map(|b| b[0])
            .expect_err("a page past the end");
        assert!(error.to_string().contains("cannot be read"), "{error}");
        assert!(segment.nonzero_end(0).is_err());
    }
}
