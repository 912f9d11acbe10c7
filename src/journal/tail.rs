//! Following a journal as it grows: [`JournalTail`] reads the frames appended since its last
//! call, verifying each frame and the chain like [`crate::journal::scan`], and yields only
//! durable records. Replicators use it to feed their projections; the engine's snapshot
//! follower uses it to keep its own copy of the ledger.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::core::CommandRecord;
use crate::core::codec::decode_record;
use crate::journal::format::{
    DURABLE_FILE_BYTES, DURABLE_FILE_NAME, FRAME_HEADER_BYTES, MAX_FRAME_BYTES,
    SEGMENT_HEADER_BYTES, check_frame, decode_durable, decode_segment_header, read_u32,
};
use crate::journal::list_segments;

/// What identifies one journal record in both sources: its transaction id and the engine's
/// timestamp of it. Projections store the identity of the record at their applied sequence, and
/// a replicator that resumes checks it against the source: a projection fed by another journal,
/// or by a tail the engine lost, has another record there (a command retried after a lost tail
/// gets a new timestamp). Shown and stored as `<uuid>@<timestamp_ns>`.
///
/// (The frame checksum would be stronger, as it chains every earlier record, but the engine's
/// event stream does not know it: the views never see frames.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    pub transaction_id: u128,
    pub timestamp_ns: u64,
}

impl RecordId {
    pub fn of(record: &CommandRecord) -> RecordId {
        RecordId {
            transaction_id: record.transaction_id.0,
            timestamp_ns: record.timestamp_ns,
        }
    }

    /// Parses the stored form `<uuid>@<timestamp_ns>`.
    pub fn parse(text: &str) -> anyhow::Result<RecordId> {
        let parsed = text.split_once('@').and_then(|(uuid, ts)| {
            Some(RecordId {
                transaction_id: uuid::Uuid::try_parse(uuid).ok()?.as_u128(),
                timestamp_ns: ts.parse().ok()?,
            })
        });
        parsed.ok_or_else(|| {
            anyhow::anyhow!("bad record identity {text:?} (want <uuid>@<timestamp_ns>)")
        })
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}",
            uuid::Uuid::from_u128(self.transaction_id).hyphenated(),
            self.timestamp_ns
        )
    }
}

struct OpenSegment {
    path: PathBuf,
    file: File,
    size: u64,
    /// Byte offset of the next frame.
    offset: u64,
    /// The first sequence its header names (and its file name).
    first_seq: u64,
    /// Device and inode of the file: a file put in its place under its name (the journal
    /// directory restored or moved while the tail ran) is another one.
    identity: (u64, u64),
    /// Byte offset of the last frame read from this segment (`None`: none yet).
    last_frame_at: Option<u64>,
}

/// A verified point in a journal that a later tail can resume from (`JournalTail::resume_at`)
/// instead of reading its segment from the start: the next frame's offset in the segment that
/// begins at `segment_first_seq`, its sequence, and the chain value before it. A resumed tail
/// still checks that the frame there continues the chain, so a stale position is an error, not
/// a silent skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailPosition {
    pub next_seq: u64,
    segment_first_seq: u64,
    offset: u64,
    last_crc: u32,
}

/// Follows the journal files of one directory from sequence 1 on, verifying every frame and the
/// checksum chain like `journal::scan`, but reading only the new bytes on each call (positioned
/// reads, no re-scan of the segment).
///
/// Durable records only: the journal writer rewrites `journal/durable` (24 bytes, see
/// `docs/journal-format.md`) after every successful sync, and the tail yields no record beyond
/// the sequence written there, so a record in the page cache whose msync has not returned yet
/// is never replicated (a power loss cannot leave a projection ahead of the recovered journal).
/// Fallback: when the file does not exist (a journal written by an engine older than the file),
/// records are yielded as soon as they are complete in the page cache, as before; with
/// `--sync none` the engine calls records durable without syncing, and so does the file.
pub struct JournalTail {
    dir: PathBuf,
    segment: Option<OpenSegment>,
    next_seq: u64,
    last_crc: u32,
    buffer: Vec<u8>,
    read_size: usize,
    /// When the bytes at the current offset first failed to parse (a write in progress, or
    /// corruption: told apart after a while by `journal::scan`).
    stuck_since: Option<Instant>,
    /// When a new segment's header was first found unwritten.
    header_stuck_since: Option<Instant>,
    /// Where `advance_segment` last sent the reader back to read once more (a segment that
    /// begins at the next sequence exists, but bytes follow this one's records): the same
    /// place again means the read made no progress there, and the bytes are damage.
    looked_again_at: Option<(PathBuf, u64)>,
    /// Records of the last `fetch`, kept to reuse the allocation.
    scratch: Vec<CommandRecord>,
    /// The durable watermark read from `journal/durable` (`None`: no such file, no limit).
    durable_limit: Option<u64>,
    /// Since when the durable file has not verified (a torn read is retried; a lasting one is
    /// reported).
    durable_bad_since: Option<Instant>,
    /// The identity of the last record yielded (see [`RecordId`]).
    last_record: Option<RecordId>,
    /// Records before this sequence are verified (chain) but not yielded; reading starts in
    /// the segment that holds it, skipping whole earlier segments.
    start_seq: u64,
    /// Bytes read from segment files so far.
    bytes_read: u64,
    /// Times this tail listed the journal directory.
    listings: u64,
    /// While records before `start_seq` are skipped, a position is kept every this many events
    /// of them (0: none), in `passed`: a reader can index them for later reads
    /// (`note_passed_every`, `take_passed`).
    passed_every: u64,
    passed: Vec<TailPosition>,
}

const MIN_READ_BYTES: usize = 64 << 10;
const MAX_READ_BYTES: usize = 8 << 20;

impl JournalTail {
    pub fn new(dir: &Path) -> JournalTail {
        JournalTail {
            dir: dir.to_path_buf(),
            segment: None,
            next_seq: 1,
            last_crc: 0,
            buffer: Vec::new(),
            read_size: MIN_READ_BYTES,
            stuck_since: None,
            header_stuck_since: None,
            looked_again_at: None,
            scratch: Vec::new(),
            durable_limit: None,
            durable_bad_since: None,
            last_record: None,
            start_seq: 1,
            bytes_read: 0,
            listings: 0,
            passed_every: 0,
            passed: Vec::new(),
        }
    }

    /// Bytes this tail has read from segment files.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Times this tail listed the journal directory (a walk from segment to segment finds each
    /// next one by its name; the directory is listed to start, at the journal's end, and at a
    /// segment that holds no record or a gap).
    pub fn directory_listings(&self) -> u64 {
        self.listings
    }

    fn list_segments(&mut self) -> Result<Vec<(u64, PathBuf)>, crate::journal::JournalError> {
        self.listings += 1;
        list_segments(&self.dir)
    }

    /// Where this tail stands (the next frame to read), once it has opened a segment.
    pub fn position(&self) -> Option<TailPosition> {
        self.segment.as_ref().map(|segment| TailPosition {
            next_seq: self.next_seq,
            segment_first_seq: segment.first_seq,
            offset: segment.offset,
            last_crc: self.last_crc,
        })
    }

    /// `start_at(seq)`, reading from `position` (of an earlier tail of this journal, at or
    /// before `seq`) instead of from the start of the segment that holds `seq`: a reader that
    /// polls a journal from where its last poll ended reads only the new bytes. A position in
    /// an earlier segment than the one holding `seq` is not used (reading on from it would read
    /// every segment in between), nor one whose segment does not open: the tail then starts as
    /// `start_at(seq)` would. Only before the first fetch.
    pub fn resume_at(&mut self, position: TailPosition, seq: u64) -> anyhow::Result<()> {
        let seq = seq.max(1);
        if position.next_seq > seq {
            bail!(
                "a tail position at sequence {} cannot start a read at {seq}",
                position.next_seq
            );
        }
        if self.segment.is_some() || self.next_seq != 1 {
            bail!("the journal tail already started");
        }
        let segments = self.list_segments()?;
        let holding = segments
            .iter()
            .rev()
            .find(|(first, _)| *first <= seq)
            .map(|(first, _)| *first);
        if holding != Some(position.segment_first_seq) {
            return self.start_at(seq);
        }
        let path = self.dir.join(crate::journal::format::segment_file_name(
            position.segment_first_seq,
        ));
        self.start_seq = position.segment_first_seq;
        if !matches!(self.open_segment(&path, true), Ok(true)) {
            self.segment = None;
            self.next_seq = 1;
            self.last_crc = 0;
            self.header_stuck_since = None;
            return self.start_at(seq);
        }
        if let Some(segment) = self.segment.as_mut() {
            segment.offset = position.offset.max(SEGMENT_HEADER_BYTES as u64);
        }
        self.next_seq = position.next_seq;
        self.last_crc = position.last_crc;
        self.start_seq = seq;
        Ok(())
    }

    /// Makes the tail start at `seq` (a record boundary, e.g. a snapshot's next sequence)
    /// instead of 1: the segments before the one that holds it are not read at all. Only
    /// before the first fetch.
    pub fn start_at(&mut self, seq: u64) -> anyhow::Result<()> {
        if self.segment.is_some() || self.next_seq != 1 {
            bail!("the journal tail already started");
        }
        self.start_seq = seq.max(1);
        Ok(())
    }

    /// Keeps a position about every `events` events of the records skipped before the start
    /// (`start_at`, `resume_at`), for `take_passed`: the first record boundary at or after
    /// each multiple of `events`. An event-stream read deep into a segment
    /// scans it from the start once; its positions then let later reads anywhere before that
    /// point resume near where they ask.
    pub fn note_passed_every(&mut self, events: u64) {
        self.passed_every = events;
    }

    /// The positions kept while skipping (`note_passed_every`), in sequence order.
    pub fn take_passed(&mut self) -> Vec<TailPosition> {
        std::mem::take(&mut self.passed)
    }

    /// The durable watermark this tail obeys (`None`: the journal has no durable file).
    pub fn durable_limit(&self) -> Option<u64> {
        self.durable_limit
    }

    /// The identity of the last record yielded.
    pub fn last_record(&self) -> Option<&RecordId> {
        self.last_record.as_ref()
    }

    /// Re-reads `journal/durable`. A missing file means no limit until one has been seen (a
    /// journal no writer has opened since it was copied), and then keeps the last limit (a
    /// writer never runs without the file: it was removed by hand, and what is past the last
    /// limit may not be durable); a file that does not verify (a read racing the writer's
    /// rewrite) keeps the previous limit, and is an error only when it stays bad for seconds.
    fn refresh_durable_limit(&mut self) -> anyhow::Result<()> {
        let path = self.dir.join(DURABLE_FILE_NAME);
        // Read as recovery reads it (a file longer than its layout is damaged, as there).
        let read = match crate::journal::reader::read_small_file(&path, DURABLE_FILE_BYTES) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other,
        };
        let decoded = match read {
            Ok(bytes) => decode_durable(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match decoded {
            Ok((seq, _)) => {
                self.durable_bad_since = None;
                // Never lower: a stale read of an older value is possible, a lower watermark
                // is not.
                self.durable_limit = Some(self.durable_limit.unwrap_or(0).max(seq));
            }
            Err(reason) => {
                let since = *self.durable_bad_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    bail!("{}: {reason}", path.display());
                }
                // Until it verifies, nothing new is yielded beyond the last good value.
                self.durable_limit = Some(self.durable_limit.unwrap_or(0));
            }
        }
        Ok(())
    }

    /// Opens the segment at `path` as the current one. Returns `false` while its header does not
    /// read as valid yet (segments are renamed into place with a durable header, so this is a
    /// file from an older writer or a damaged one): try again later.
    fn open_segment(&mut self, path: &Path, first: bool) -> anyhow::Result<bool> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        if size < SEGMENT_HEADER_BYTES as u64 {
            return self.header_not_ready(path, "shorter than its header");
        }
        file.read_exact_at(&mut header, 0)
            .with_context(|| format!("reading the header of {}", path.display()))?;
        let header = match decode_segment_header(&header) {
            Ok(h) => h,
            Err(e) => return self.header_not_ready(path, e),
        };
        self.header_stuck_since = None;
        // As recovery checks: a segment's file name is its first sequence (a file copied or
        // restored under another segment's name would be read as records it does not hold).
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(crate::journal::format::parse_segment_file_name);
        if let Some(named) = named
            && named != header.first_seq
        {
            bail!(
                "{}: segment header disagrees with its file name (it begins at sequence {})",
                path.display(),
                header.first_seq
            );
        }
        if first {
            if header.first_seq > self.start_seq {
                bail!(
                    "{}: the journal starts at sequence {}, after {}",
                    path.display(),
                    header.first_seq,
                    self.start_seq
                );
            }
            self.next_seq = header.first_seq;
            self.last_crc = header.prev_crc;
        } else if header.first_seq != self.next_seq || header.prev_crc != self.last_crc {
            bail!(
                "{}: segment does not continue the previous one (gap or broken chain)",
                path.display()
            );
        }
        let identity = file_identity(&file.metadata()?);
        self.segment = Some(OpenSegment {
            path: path.to_path_buf(),
            identity,
            last_frame_at: None,
            file,
            size,
            offset: SEGMENT_HEADER_BYTES as u64,
            first_seq: header.first_seq,
        });
        Ok(true)
    }

    /// A new segment's header is written right after the file is created; one that stays bad
    /// for seconds is corruption.
    fn header_not_ready(&mut self, path: &Path, reason: &str) -> anyhow::Result<bool> {
        let since = *self.header_stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(5) {
            bail!("{}: {reason}", path.display());
        }
        Ok(false)
    }

    /// The sequence number of the next event this tail will yield.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Like `fetch_records`, but hands each record to `visit` (through a buffer the tail keeps,
    /// so a caller that converts records need not allocate its own).
    pub fn fetch_with(
        &mut self,
        max_events: usize,
        mut visit: impl FnMut(&CommandRecord),
    ) -> anyhow::Result<()> {
        let mut records = std::mem::take(&mut self.scratch);
        records.clear();
        let result = self.fetch_records(max_events, &mut records);
        records.iter().for_each(&mut visit);
        self.scratch = records;
        result
    }

    /// The journal directory this tail follows.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends the whole records written since the last call, until at least `max_events`
    /// events were added or the end of what is written was reached.
    pub fn fetch_records(
        &mut self,
        max_events: usize,
        out: &mut Vec<CommandRecord>,
    ) -> anyhow::Result<()> {
        self.fetch_inner(max_events, out, None)
    }

    /// `fetch_records`, also appending to `chains` each record's frame checksum (the journal's
    /// chain value after it), one per record added to `out`.
    pub fn fetch_records_with_chains(
        &mut self,
        max_events: usize,
        out: &mut Vec<CommandRecord>,
        chains: &mut Vec<u32>,
    ) -> anyhow::Result<()> {
        self.fetch_inner(max_events, out, Some(chains))
    }

    fn fetch_inner(
        &mut self,
        max_events: usize,
        out: &mut Vec<CommandRecord>,
        mut chains: Option<&mut Vec<u32>>,
    ) -> anyhow::Result<()> {
        if self.segment.is_none() {
            let segments = self.list_segments()?;
            // The last segment that begins at or before the start (segments are named by their
            // first sequence).
            let start = segments
                .iter()
                .rposition(|(first, _)| *first <= self.start_seq);
            let Some((_, path)) = start.and_then(|i| segments.get(i)).or(segments.first()) else {
                return Ok(());
            };
            let path = path.clone();
            if !self.open_segment(&path, true)? {
                return Ok(());
            }
        }
        self.refresh_durable_limit()?;
        let mut events = 0usize;
        while events < max_events {
            let (progressed, added) =
                self.read_chunk(max_events - events, out, chains.as_deref_mut())?;
            events += added;
            if !progressed && !self.advance_segment()? {
                break;
            }
        }
        Ok(())
    }

    /// Parses frames from one positioned read. Returns whether any record was read, and how many
    /// events were added.
    fn read_chunk(
        &mut self,
        max_events: usize,
        out: &mut Vec<CommandRecord>,
        mut chains: Option<&mut Vec<u32>>,
    ) -> anyhow::Result<(bool, usize)> {
        let Some(segment) = self.segment.as_mut() else {
            return Ok((false, 0));
        };
        if segment.size.saturating_sub(segment.offset) < self.read_size as u64 {
            // Segments are preallocated, but a file that grows as it is written works too.
            segment.size = segment.file.metadata()?.len();
        }
        let remaining = segment.size.saturating_sub(segment.offset) as usize;
        let want = self.read_size.min(remaining);
        if want < FRAME_HEADER_BYTES {
            return Ok((false, 0));
        }
        self.buffer.resize(want, 0);
        segment
            .file
            .read_exact_at(&mut self.buffer, segment.offset)
            .with_context(|| format!("reading {} at {}", segment.path.display(), segment.offset))?;
        self.bytes_read += want as u64;
        let mut at = 0usize;
        let mut events = 0usize;
        let mut stuck = false;
        let mut last_frame = None;
        while at + FRAME_HEADER_BYTES <= self.buffer.len() && events < max_events {
            let length = read_u32(&self.buffer, at) as usize;
            if length == 0 {
                break; // unwritten space: the end for now
            }
            if length <= MAX_FRAME_BYTES && at + length > self.buffer.len() {
                break; // the frame continues past this read
            }
            match check_frame(&self.buffer[at..]) {
                // Written, but not durable yet.
                Ok(frame)
                    if self
                        .durable_limit
                        .is_some_and(|limit| frame.sequence > limit) =>
                {
                    break;
                }
                Ok(frame) => {
                    if frame.sequence != self.next_seq || frame.prev_crc != self.last_crc {
                        bail!(
                            "journal {} at offset {}: sequence {} / chain break (expected sequence {})",
                            segment.path.display(),
                            segment.offset + at as u64,
                            frame.sequence,
                            self.next_seq
                        );
                    }
                    last_frame = Some(at);
                    let payload = &self.buffer[at + FRAME_HEADER_BYTES..at + frame.length];
                    let record = decode_record(frame.sequence, payload).map_err(|e| {
                        anyhow::anyhow!(
                            "journal {}: undecodable record {}: {e}",
                            segment.path.display(),
                            frame.sequence
                        )
                    })?;
                    let before = self.next_seq;
                    self.next_seq = record.next_seq();
                    self.last_crc = frame.crc;
                    self.last_record = Some(RecordId::of(&record));
                    if record.first_seq >= self.start_seq {
                        events += record.event_count as usize;
                        out.push(record);
                        if let Some(chains) = chains.as_deref_mut() {
                            chains.push(frame.crc);
                        }
                    } else if self.passed_every > 0
                        && self.next_seq / self.passed_every > before / self.passed_every
                    {
                        // A record boundary, as `position` gives one: the first at or after
                        // a multiple of `passed_every`, the same whatever the read started
                        // from, so that reads keep at most one position per multiple.
                        self.passed.push(TailPosition {
                            next_seq: self.next_seq,
                            segment_first_seq: segment.first_seq,
                            offset: segment.offset + (at + frame.length) as u64,
                            last_crc: self.last_crc,
                        });
                    }
                    at += frame.length;
                }
                Err(_) => {
                    stuck = true;
                    break;
                }
            }
        }
        if let Some(last) = last_frame {
            segment.last_frame_at = Some(segment.offset + last as u64);
        }
        segment.offset += at as u64;
        // Read more next time when this read was filled, less when the tail was reached.
        self.read_size = if at * 2 >= self.buffer.len() {
            (self.read_size * 2).min(MAX_READ_BYTES)
        } else {
            MIN_READ_BYTES.max(at * 2)
        };
        if stuck && at == 0 {
            self.check_stuck()?;
        } else {
            self.stuck_since = None;
        }
        Ok((at > 0, events))
    }

    /// A frame that does not verify at the tail is usually a write in progress. If it stays bad,
    /// let the journal's own scan decide between a torn tail (keep waiting: the engine cuts it
    /// on its next start) and corruption (stop with its error). A frame the durable watermark
    /// covers was synced whole before the file named it: one that does not verify is damage,
    /// even where the scan, which finds nothing valid after it, would call it a torn tail.
    fn check_stuck(&mut self) -> anyhow::Result<()> {
        let since = *self.stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(2) {
            self.stuck_since = Some(Instant::now());
            let next = self.next_seq;
            // Read before the scan: a running writer only moves it forward.
            let durable = crate::journal::durable_watermark(&self.dir)?;
            let result = crate::journal::scan(&self.dir, next, |_| Err("stop".into()));
            match result {
                Ok(end) if durable.is_some_and(|d| end.next_seq <= d) => {
                    let (file, offset) = match &end.segment {
                        Some((path, valid_end)) => (
                            path.display().to_string(),
                            end.torn_at.unwrap_or(*valid_end),
                        ),
                        None => (self.dir.display().to_string(), 0),
                    };
                    bail!(
                        "journal damaged: {file} at byte {offset}: the record at sequence {} does \
                         not verify, but the durable watermark says up to {} was synced",
                        end.next_seq,
                        durable.unwrap_or_default()
                    );
                }
                Ok(_) | Err(crate::journal::JournalError::Visitor { .. }) => {
                    tracing::warn!(
                        seq = next,
                        "the journal tail does not verify yet (a write in progress or a torn tail)"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// At the end of the current segment: moves to the next one if the writer created it.
    fn advance_segment(&mut self) -> anyhow::Result<bool> {
        // First: a segment replaced under its name is read on from its new file (the old one
        // has no more frames, and whatever comes after it would look like a gap or damage).
        if self.follow_replaced_segment()? {
            return Ok(true);
        }
        let Some(current) = self.segment.as_ref().map(|s| s.path.clone()) else {
            return Ok(false);
        };
        // The next segment where the writer names it: one look-up of a name, not a listing of
        // the directory (a walk over N segments listed and sorted N names at each, quadratic:
        // the read views' rebuild over 17,380 segments of 4 KiB took 133 s). The directory is
        // listed only when it is not there (the live end, a gap) or this segment holds no
        // record.
        let by_name = self
            .dir
            .join(crate::journal::format::segment_file_name(self.next_seq));
        let segments = if by_name != current
            && std::fs::exists(&by_name).map_err(|e| {
                anyhow::Error::from(e).context(format!("checking {}", by_name.display()))
            })? {
            vec![(self.next_seq, by_name)]
        } else {
            self.list_segments()?
        };
        let Some(segment) = self.segment.as_ref() else {
            return Ok(false);
        };
        let next = segments
            .iter()
            .find(|(first, _)| *first == self.next_seq)
            .filter(|(_, path)| *path != segment.path);
        let Some((_, path)) = next else {
            // The writer finishes a segment before it creates the next, so a later segment
            // that is already there means this one has no more records to come.
            if let Some((later, later_path)) = segments.iter().find(|(f, _)| *f > self.next_seq)
                && !more_frames(segment)?
            {
                // Bytes after the end of this segment's records are damage inside it (a
                // zeroed frame), not missing files.
                if let Some(at) = nonzero_after(segment)? {
                    return Err(JournalDamage {
                        segment: segment.path.clone(),
                        offset: segment.offset,
                        data_at: at,
                        next_begins_at: *later,
                    }
                    .into());
                }
                // Nothing at all after this segment's records, and no other segment begins
                // where they end (this one may: it then holds no record at all, although the
                // writer rolled on from it): the records up to the later segment are missing.
                return Err(JournalGap {
                    segment: later_path.clone(),
                    begins_at: *later,
                    previous_ends_at: self.next_seq - 1,
                    emptied: (segment.first_seq == self.next_seq).then(|| segment.path.clone()),
                }
                .into());
            }
            // Data that does not verify as a frame where this finished segment's records stop
            // (a frame whose length runs past the end of the file, say): damage, once a second
            // look has read what the writer wrote before it moved on (the read that found it may
            // predate that). Returning "nothing yet" instead stalled the tail on it forever:
            // replicators and the read views stopped without an error. A frame that verifies
            // is waiting for the durable watermark, not damage.
            if let Some((later, _)) = segments.iter().find(|(f, _)| *f > self.next_seq)
                && !frame_verifies_at(segment)?
            {
                let here = (segment.path.clone(), segment.offset);
                if self.looked_again_at.as_ref() == Some(&here) {
                    return Err(JournalDamage {
                        segment: segment.path.clone(),
                        offset: segment.offset,
                        data_at: segment.offset,
                        next_begins_at: *later,
                    }
                    .into());
                }
                self.looked_again_at = Some(here);
                return Ok(true);
            }
            return Ok(false);
        };
        // The writer finishes a segment before creating the next, but our last read may predate
        // that: look once more before leaving. Once: the next segment begins at our next
        // sequence, so no frame can follow this segment's records; bytes that still do not
        // read as one after a second look are damage (reading them again forever would spin).
        if more_frames(segment)? {
            let here = (segment.path.clone(), segment.offset);
            if self.looked_again_at.as_ref() == Some(&here) {
                return Err(JournalDamage {
                    segment: segment.path.clone(),
                    offset: segment.offset,
                    data_at: nonzero_after(segment)?.unwrap_or(segment.offset),
                    next_begins_at: self.next_seq,
                }
                .into());
            }
            self.looked_again_at = Some(here);
            return Ok(true); // more frames appeared: read them first
        }
        let path = path.clone();
        self.open_segment(&path, false)
    }
}

impl JournalTail {
    /// At the end of the current segment's records: whether its file was replaced under its
    /// name (the journal directory restored, moved or recreated while the tail ran). The tail
    /// read the old file forever, and nothing new ever came: a replicator reported itself
    /// caught up while its stores went stale. A new file that holds the last frame this tail
    /// read where it read it and goes on with the record it expects next (the same history) is
    /// followed from there; until its next frame is written, it is only checked. A segment that
    /// is gone, a journal that ends before this position, or one of another history stop the
    /// tail. Returns whether it moved to the new file.
    fn follow_replaced_segment(&mut self) -> anyhow::Result<bool> {
        let Some(segment) = self.segment.as_ref() else {
            return Ok(false);
        };
        let restart = "restart the reader on the journal as it is now";
        let current = match std::fs::metadata(&segment.path) {
            Ok(meta) => file_identity(&meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{}: the journal segment this tail reads is gone (the journal directory was removed or replaced while it ran); {restart}",
                segment.path.display()
            ),
            Err(e) => {
                return Err(
                    anyhow::Error::from(e).context(format!("checking {}", segment.path.display()))
                );
            }
        };
        if current == segment.identity {
            return Ok(false);
        }
        if let Some(durable) = crate::journal::durable_watermark(&self.dir)?
            && durable + 1 < self.next_seq
        {
            bail!(
                "{}: the journal segment was replaced (the journal directory restored or moved while this tail ran) by a journal whose durable watermark is {durable}, before sequence {}, which this tail has read: an older copy or another history; {restart}",
                segment.path.display(),
                self.next_seq - 1
            );
        }
        let file = File::open(&segment.path)
            .with_context(|| format!("opening {}", segment.path.display()))?;
        let size = file.metadata()?.len();
        let available = usize::try_from(size.saturating_sub(segment.offset)).unwrap_or(usize::MAX);
        let mut bytes = vec![0u8; MAX_FRAME_BYTES.min(available)];
        if bytes.len() < FRAME_HEADER_BYTES {
            return Ok(false);
        }
        file.read_exact_at(&mut bytes, segment.offset)
            .with_context(|| format!("reading {} at {}", segment.path.display(), segment.offset))?;
        if read_u32(&bytes, 0) == 0 {
            // Nothing written there yet: the new file must hold what was read up to here (an
            // older copy, or another history shorter in bytes, does not). Look again at the
            // next read.
            if !self.holds_what_was_read(&file)? {
                bail!(
                    "{}: the journal segment was replaced (the journal directory restored or moved while this tail ran) by one that does not hold the record ending at sequence {} where this tail read it: an older copy or another history; {restart}",
                    segment.path.display(),
                    self.next_seq - 1
                );
            }
            return Ok(false);
        }
        match check_frame(&bytes) {
            Ok(frame) if frame.sequence == self.next_seq && frame.prev_crc == self.last_crc => {
                tracing::warn!(segment = %segment.path.display(), seq = self.next_seq, "the journal segment was replaced under its name (a restore or a move) by one of the same history: following the new file");
                let Some(segment) = self.segment.as_mut() else {
                    return Ok(false);
                };
                segment.file = file;
                segment.size = size;
                segment.identity = current;
                Ok(true)
            }
            Ok(frame) => bail!(
                "{}: the journal segment was replaced (the journal directory restored or moved while this tail ran) by one of another history: at byte offset {} it holds sequence {} chained to {:08x}, where this tail expects sequence {} chained to {:08x}; {restart}",
                segment.path.display(),
                segment.offset,
                frame.sequence,
                frame.prev_crc,
                self.next_seq,
                self.last_crc
            ),
            // A write in progress: look again at the next read.
            Err(_) => Ok(false),
        }
    }
}

impl JournalTail {
    /// Whether `file`, a replacement of the current segment's, holds the last frame this tail
    /// read from it at the same offset, or (none read yet) the same header.
    fn holds_what_was_read(&self, file: &File) -> anyhow::Result<bool> {
        let Some(segment) = self.segment.as_ref() else {
            return Ok(true);
        };
        let size = file.metadata()?.len();
        match segment.last_frame_at {
            Some(at) => {
                let available = usize::try_from(size.saturating_sub(at)).unwrap_or(usize::MAX);
                let mut bytes = vec![0u8; MAX_FRAME_BYTES.min(available)];
                if bytes.len() < FRAME_HEADER_BYTES {
                    return Ok(false);
                }
                file.read_exact_at(&mut bytes, at)?;
                Ok(check_frame(&bytes).is_ok_and(|frame| frame.crc == self.last_crc))
            }
            None => {
                if size < SEGMENT_HEADER_BYTES as u64 {
                    return Ok(false);
                }
                let mut header = [0u8; SEGMENT_HEADER_BYTES];
                file.read_exact_at(&mut header, 0)?;
                Ok(decode_segment_header(&header)
                    .is_ok_and(|h| h.first_seq == segment.first_seq && h.prev_crc == self.last_crc))
            }
        }
    }
}

fn file_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// A gap between two segments: definitive (unlike a frame that does not verify yet, which may
/// be a write in progress), so readers that retry other errors stop on it.
#[derive(Debug)]
pub struct JournalGap {
    pub segment: std::path::PathBuf,
    pub begins_at: u64,
    pub previous_ends_at: u64,
    /// The segment before, when it is there but holds no readable record (zeros after its
    /// header): its records are what is missing, not a file.
    pub emptied: Option<std::path::PathBuf>,
}

impl std::error::Error for JournalGap {}

impl std::fmt::Display for JournalGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (segment, begins_at, ends_at) = (
            self.segment.display(),
            self.begins_at,
            self.previous_ends_at,
        );
        match &self.emptied {
            Some(emptied) => write!(
                f,
                "{}: a finished segment with no readable record (zeros after its header), but \
                 the next one, {segment}, begins at {begins_at}: records {} to {} are lost",
                emptied.display(),
                ends_at + 1,
                begins_at - 1
            ),
            None => write!(
                f,
                "{segment}: the segment before it ends at sequence {ends_at}, but this one \
                 begins at {begins_at} (a gap in the journal: segments are missing)"
            ),
        }
    }
}

/// Damage inside a segment that a later one follows: no readable record where its records
/// stop, but data after that. Definitive, like `JournalGap` (the writer finished this segment).
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: no readable record at offset {offset} but data at offset {data_at} (damage inside the \
     segment; the next segment begins at sequence {next_begins_at})",
    segment.display()
)]
pub struct JournalDamage {
    pub segment: std::path::PathBuf,
    pub offset: u64,
    pub data_at: u64,
    pub next_begins_at: u64,
}

/// Whether a frame has been written at the segment's read offset since the last read.
fn more_frames(segment: &OpenSegment) -> std::io::Result<bool> {
    let mut probe = [0u8; 4];
    // The file's size now (a segment that grows as it is written may have grown).
    let size = segment.file.metadata()?.len();
    if segment.offset + 4 <= size {
        segment.file.read_exact_at(&mut probe, segment.offset)?;
        return Ok(u32::from_le_bytes(probe) != 0);
    }
    Ok(false)
}

/// Whether the bytes at the segment's read offset verify as a whole frame (of any sequence).
fn frame_verifies_at(segment: &OpenSegment) -> std::io::Result<bool> {
    let size = segment.file.metadata()?.len();
    let n = size
        .saturating_sub(segment.offset)
        .min(MAX_FRAME_BYTES as u64) as usize;
    let mut bytes = vec![0u8; n];
    segment.file.read_exact_at(&mut bytes, segment.offset)?;
    Ok(check_frame(&bytes).is_ok())
}

/// The offset of the first non-zero byte after the segment's read offset, if any.
fn nonzero_after(segment: &OpenSegment) -> std::io::Result<Option<u64>> {
    let size = segment.file.metadata()?.len();
    let mut buffer = vec![0u8; 1 << 20];
    let mut at = segment.offset;
    while at < size {
        let n = ((size - at) as usize).min(buffer.len());
        segment.file.read_exact_at(&mut buffer[..n], at)?;
        if let Some(i) = buffer[..n].iter().position(|b| *b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}
