//! Byte layouts of segment headers and record frames (see `docs/journal-format.md`).

/// Bytes at the start of every segment file.
pub const SEGMENT_HEADER_BYTES: usize = 64;
pub const SEGMENT_MAGIC: [u8; 8] = *b"WALSEG01";
/// Bytes of the frame header in front of every record payload.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Version 2: checkpoint records carry the digest-based state hash (`wallet-state-v2`) and
/// fingerprints are built from cached account-id hashes. A version-1 journal is refused.
pub const FORMAT_VERSION: u16 = 2;
/// The largest frame the encoder can produce: header, command header, two events, a 64-byte name.
pub const MAX_FRAME_BYTES: usize = FRAME_HEADER_BYTES + 40 + 2 * 24 + 64;

#[repr(C)]
pub struct SegmentHeaderLayout {
    pub magic: [u8; 8],
    pub version: u16,
    pub reserved: [u8; 6],
    pub first_seq: u64,
    pub segment_size: u64,
    pub prev_crc: u32,
    pub reserved2: [u8; 24],
    pub header_crc: u32,
}
const _: () = assert!(size_of::<SegmentHeaderLayout>() == SEGMENT_HEADER_BYTES);

#[repr(C)]
pub struct FrameHeaderLayout {
    pub length: u32,
    pub crc: u32,
    pub sequence: u64,
    pub prev_crc: u32,
    pub version: u16,
    pub reserved: u16,
}
const _: () = assert!(size_of::<FrameHeaderLayout>() == FRAME_HEADER_BYTES);

pub fn encode_segment_header(
    first_seq: u64,
    segment_size: u64,
    prev_crc: u32,
) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    h[24..32].copy_from_slice(&segment_size.to_le_bytes());
    h[32..36].copy_from_slice(&prev_crc.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    pub segment_size: u64,
    pub prev_crc: u32,
}

pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err("segment shorter than its header");
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if crc32c::crc32c(&bytes[0..60]).to_le_bytes() != bytes[60..64] {
        return Err("segment header checksum mismatch");
    }
    if u16::from_le_bytes([bytes[8], bytes[9]]) != FORMAT_VERSION {
        return Err("unsupported segment version");
    }
    Ok(SegmentHeader {
        first_seq: read_u64(bytes, 16),
        segment_size: read_u64(bytes, 24),
        prev_crc: read_u32(bytes, 32),
    })
}

pub fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The frame checksum: CRC32C over bytes 8..length (sequence, chain, version, payload), then the
/// length field. Everything but the checksum itself is covered.
pub fn frame_crc(frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&frame[8..]);
    crc32c::crc32c_append(crc, &frame[0..4])
}

/// Fills in the frame header in front of an already written payload and returns the checksum.
/// `frame` is the whole frame: header followed by payload, length a multiple of 8.
pub fn seal_frame(frame: &mut [u8], sequence: u64, prev_crc: u32) -> u32 {
    let length = u32::try_from(frame.len()).expect("frame length fits u32");
    frame[0..4].copy_from_slice(&length.to_le_bytes());
    frame[8..16].copy_from_slice(&sequence.to_le_bytes());
    frame[16..20].copy_from_slice(&prev_crc.to_le_bytes());
    frame[20..22].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    frame[22..24].copy_from_slice(&[0, 0]);
    let crc = frame_crc(frame);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// What a frame's header claims, checked against the bytes it covers.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub length: usize,
    pub crc: u32,
    pub sequence: u64,
    pub prev_crc: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Length 0: preallocated space that was never written.
    End,
    BadLength,
    BadChecksum,
    BadVersion,
}

pub fn check_frame(bytes: &[u8]) -> Result<Frame, FrameError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::BadLength);
    }
    let length = read_u32(bytes, 0) as usize;
    if length == 0 {
        return Err(FrameError::End);
    }
    if !(FRAME_HEADER_BYTES + 40..=MAX_FRAME_BYTES).contains(&length)
        || !length.is_multiple_of(8)
        || length > bytes.len()
    {
        return Err(FrameError::BadLength);
    }
    let frame = &bytes[..length];
    let crc = read_u32(frame, 4);
    if frame_crc(frame) != crc {
        return Err(FrameError::BadChecksum);
    }
    if u16::from_le_bytes([frame[20], frame[21]]) != FORMAT_VERSION || frame[22..24] != [0, 0] {
        return Err(FrameError::BadVersion);
    }
    Ok(Frame {
        length,
        crc,
        sequence: read_u64(frame, 8),
        prev_crc: read_u32(frame, 16),
    })
}

pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.wal")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Name of the file a `--sync none` writer leaves in the journal directory: the segments from
/// the one it names on may hold records only in the page cache.
pub const UNSYNCED_FILE_NAME: &str = "unsynced";
pub const UNSYNCED_MAGIC: [u8; 8] = *b"WALUNS01";
/// Bytes of the unsynced-segments file.
pub const UNSYNCED_FILE_BYTES: usize = 24;

/// The unsynced-segments file: written (and synced, with its directory) by a writer that opens
/// the journal under `--sync none`, before it writes anything; removed by the next writer with
/// a real sync mode once it has rewritten and synced those segments.
#[repr(C)]
pub struct UnsyncedLayout {
    pub magic: [u8; 8],
    /// The first sequence of the oldest segment that may hold unsynced records.
    pub from_segment: u64,
    /// CRC32C of bytes 0..16.
    pub file_crc: u32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<UnsyncedLayout>() == UNSYNCED_FILE_BYTES);

pub fn encode_unsynced(from_segment: u64) -> [u8; UNSYNCED_FILE_BYTES] {
    let mut b = [0u8; UNSYNCED_FILE_BYTES];
    b[0..8].copy_from_slice(&UNSYNCED_MAGIC);
    b[8..16].copy_from_slice(&from_segment.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The segment `encode_unsynced` named, or why the bytes are not an unsynced-segments file.
pub fn decode_unsynced(bytes: &[u8]) -> Result<u64, &'static str> {
    if bytes.len() != UNSYNCED_FILE_BYTES {
        return Err("unsynced-segments file is not 24 bytes");
    }
    if bytes[0..8] != UNSYNCED_MAGIC {
        return Err("bad unsynced-segments file magic");
    }
    if crc32c::crc32c(&bytes[0..16]).to_le_bytes() != bytes[16..20] {
        return Err("unsynced-segments file checksum mismatch");
    }
    Ok(read_u64(bytes, 8))
}

/// Name of the durable-watermark file in the journal directory.
pub const DURABLE_FILE_NAME: &str = "durable";

/// Name of the journal's reserve in the journal directory: a file of one segment's size, its
/// blocks allocated and its bytes meaningless, removed to make room for the next segment when
/// the disk is full (`JournalWriter::space_short`).
pub const RESERVE_FILE_NAME: &str = "reserve";
pub const DURABLE_MAGIC: [u8; 8] = *b"WALDUR01";
/// Bytes of the durable-watermark file.
pub const DURABLE_FILE_BYTES: usize = 24;

/// The durable-watermark file: rewritten in place (one `pwrite`) after every successful sync,
/// so that a process outside the engine can tell durable records from ones still in flight.
#[repr(C)]
pub struct DurableLayout {
    pub magic: [u8; 8],
    /// The last sequence number whose record is durable (0: none).
    pub durable_seq: u64,
    /// The frame `crc` of the record that ends at `durable_seq` (0 when `durable_seq` is 0).
    pub last_crc: u32,
    /// CRC32C of bytes 0..20.
    pub file_crc: u32,
}
const _: () = assert!(size_of::<DurableLayout>() == DURABLE_FILE_BYTES);

pub fn encode_durable(durable_seq: u64, last_crc: u32) -> [u8; DURABLE_FILE_BYTES] {
    let mut b = [0u8; DURABLE_FILE_BYTES];
    b[0..8].copy_from_slice(&DURABLE_MAGIC);
    b[8..16].copy_from_slice(&durable_seq.to_le_bytes());
    b[16..20].copy_from_slice(&last_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// `(durable_seq, last_crc)`, or why the bytes are not a durable-watermark file (a torn read of
/// a concurrent rewrite fails the checksum: read again).
pub fn decode_durable(bytes: &[u8]) -> Result<(u64, u32), &'static str> {
    if bytes.len() != DURABLE_FILE_BYTES {
        return Err("durable file is not 24 bytes");
    }
    if bytes[0..8] != DURABLE_MAGIC {
        return Err("bad durable file magic");
    }
    if crc32c::crc32c(&bytes[0..20]).to_le_bytes() != bytes[20..24] {
        return Err("durable file checksum mismatch");
    }
    Ok((read_u64(bytes, 8), read_u32(bytes, 16)))
}

#[cfg(test)]
mod durable_tests {
    use super::*;

    #[test]
    fn durable_file_round_trips_and_rejects_damage() {
        let bytes = encode_durable(123_456_789, 0xdead_beef);
        assert_eq!(decode_durable(&bytes), Ok((123_456_789, 0xdead_beef)));
        for i in 0..DURABLE_FILE_BYTES {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(decode_durable(&bad).is_err(), "a flipped bit at byte {i}");
        }
        assert!(decode_durable(&bytes[..20]).is_err());
        // Longer than its layout (something appended, a file put in its place): damaged too.
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode_durable(&longer), Err("durable file is not 24 bytes"));
    }
}
