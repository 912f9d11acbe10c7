//! Whole command records from the journal files of a data directory, tailed in place.
//!
//! The SQL projection needs more than the Redis one gets from [`super::super::source`]: the
//! transaction id, the time stamp and the signed amount of every event, and the two sides of a
//! transfer together. This reader follows the same rules as `source::JournalTail` (positioned
//! reads of the new bytes only, every frame and the checksum chain verified, a frame that stays
//! bad handed to `journal::scan` to tell a torn tail from corruption) but yields the decoded
//! [`CommandRecord`]s themselves. It is a private copy rather than a change to `source.rs`,
//! which another replicator owns.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::core::CommandRecord;
use crate::core::codec::decode_record;
use crate::journal::format::{
    FRAME_HEADER_BYTES, MAX_FRAME_BYTES, SEGMENT_HEADER_BYTES, check_frame, decode_segment_header,
    read_u32,
};
use crate::journal::list_segments;

struct OpenSegment {
    path: PathBuf,
    file: File,
    size: u64,
    /// Byte offset of the next frame.
    offset: u64,
}

/// Follows the journal of one directory from sequence 1 on.
///
/// Records are read as soon as they are complete in the page cache, which with `--sync batch`
/// can be a moment before the engine's msync returns: a power loss can then leave the shards
/// ahead of the recovered journal, which `wallet reconcile sql` reports.
pub struct RecordTail {
    dir: PathBuf,
    segment: Option<OpenSegment>,
    next_seq: u64,
    last_crc: u32,
    buffer: Vec<u8>,
    read_size: usize,
    stuck_since: Option<Instant>,
}

const MIN_READ_BYTES: usize = 64 << 10;
const MAX_READ_BYTES: usize = 8 << 20;

impl RecordTail {
    pub fn new(journal_dir: &Path) -> RecordTail {
        RecordTail {
            dir: journal_dir.to_path_buf(),
            segment: None,
            next_seq: 1,
            last_crc: 0,
            buffer: Vec::new(),
            read_size: MIN_READ_BYTES,
            stuck_since: None,
        }
    }

    /// The sequence number of the next event this tail will yield.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn open_segment(&mut self, path: &Path, first: bool) -> anyhow::Result<()> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        file.read_exact_at(&mut header, 0)
            .with_context(|| format!("reading the header of {}", path.display()))?;
        let header = decode_segment_header(&header)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if first {
            if header.first_seq != 1 {
                bail!(
                    "{}: the journal starts at sequence {}, not 1",
                    path.display(),
                    header.first_seq
                );
            }
            self.last_crc = header.prev_crc;
        } else if header.first_seq != self.next_seq || header.prev_crc != self.last_crc {
            bail!(
                "{}: segment does not continue the previous one (gap or broken chain)",
                path.display()
            );
        }
        self.segment = Some(OpenSegment {
            path: path.to_path_buf(),
            file,
            size,
            offset: SEGMENT_HEADER_BYTES as u64,
        });
        Ok(())
    }

    /// Appends the records written since the last call, whole records only, until at least
    /// `max_events` events were added or the end of what is written was reached.
    pub fn fetch(&mut self, max_events: usize, out: &mut Vec<CommandRecord>) -> anyhow::Result<()> {
        if self.segment.is_none() {
            let segments = list_segments(&self.dir)?;
            let Some((_, path)) = segments.first() else {
                return Ok(());
            };
            let path = path.clone();
            self.open_segment(&path, true)?;
        }
        let mut events = 0usize;
        while events < max_events {
            let (progressed, added) = self.read_chunk(max_events - events, out)?;
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
    ) -> anyhow::Result<(bool, usize)> {
        let Some(segment) = self.segment.as_mut() else {
            return Ok((false, 0));
        };
        if segment.size.saturating_sub(segment.offset) < self.read_size as u64 {
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
        let mut at = 0usize;
        let mut events = 0usize;
        let mut stuck = false;
        while at + FRAME_HEADER_BYTES <= self.buffer.len() && events < max_events {
            let length = read_u32(&self.buffer, at) as usize;
            if length == 0 {
                break; // unwritten space: the end for now
            }
            if length <= MAX_FRAME_BYTES && at + length > self.buffer.len() {
                break; // the frame continues past this read
            }
            match check_frame(&self.buffer[at..]) {
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
                    let payload = &self.buffer[at + FRAME_HEADER_BYTES..at + frame.length];
                    let record = decode_record(frame.sequence, payload).map_err(|e| {
                        anyhow::anyhow!(
                            "journal {}: undecodable record {}: {e}",
                            segment.path.display(),
                            frame.sequence
                        )
                    })?;
                    events += record.event_count as usize;
                    self.next_seq = record.next_seq();
                    self.last_crc = frame.crc;
                    out.push(record);
                    at += frame.length;
                }
                Err(_) => {
                    stuck = true;
                    break;
                }
            }
        }
        segment.offset += at as u64;
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
    /// the journal's own scan decides between a torn tail (keep waiting) and corruption (stop).
    fn check_stuck(&mut self) -> anyhow::Result<()> {
        let since = *self.stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(2) {
            self.stuck_since = Some(Instant::now());
            let next = self.next_seq;
            match crate::journal::scan(&self.dir, next, |_| Err("stop".into())) {
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
        let segments = list_segments(&self.dir)?;
        let Some((_, path)) = segments.iter().find(|(first, _)| *first == self.next_seq) else {
            return Ok(false);
        };
        let Some(segment) = self.segment.as_ref() else {
            return Ok(false);
        };
        if segment.path == *path {
            return Ok(false);
        }
        // The writer finishes a segment before creating the next, but our last read may predate
        // that: look once more before leaving.
        let mut probe = [0u8; 4];
        if segment.offset + 4 <= segment.size {
            segment.file.read_exact_at(&mut probe, segment.offset)?;
            if u32::from_le_bytes(probe) != 0 {
                return Ok(true);
            }
        }
        let path = path.clone();
        self.open_segment(&path, false)?;
        Ok(true)
    }
}
