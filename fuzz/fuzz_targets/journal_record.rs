//! The journal's record decoder and frame checker on hostile bytes.
//!
//! Input layout: the first 8 bytes are the frame's sequence number (little-endian), the rest is
//! a record payload. Checks, besides "no panic":
//! - `decode_record(seq, payload)` = `Ok(r)` implies `encode_record(r)` into `payload_len(r)`
//!   bytes gives back exactly `payload` (the encoding is canonical) and decodes to `r` again;
//! - the whole input through `check_frame`, and what it accepts through `decode_record`, as the
//!   journal reader does;
//! - the payload sealed into a frame (`seal_frame`) passes `check_frame` with that sequence
//!   whenever its length is one the writer could produce.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wallet::core::codec::{decode_record, encode_record, payload_len};
use wallet::journal::format::{FRAME_HEADER_BYTES, MAX_FRAME_BYTES, check_frame, seal_frame};

fuzz_target!(|data: &[u8]| {
    // As the journal reader does: frame check first, then the payload it covers.
    if let Ok(frame) = check_frame(data) {
        assert!(frame.length >= FRAME_HEADER_BYTES && frame.length <= data.len().min(MAX_FRAME_BYTES));
        let _ = decode_record(frame.sequence, &data[FRAME_HEADER_BYTES..frame.length]);
    }

    let (seq, payload) = match data.split_first_chunk::<8>() {
        Some((seq, payload)) => (u64::from_le_bytes(*seq), payload),
        None => (1, data),
    };
    if let Ok(record) = decode_record(seq, payload) {
        assert_eq!(record.first_seq, seq);
        let len = payload_len(&record);
        let mut buffer = vec![0xA5; len];
        assert_eq!(encode_record(&record, &mut buffer), len);
        assert_eq!(buffer, payload, "re-encoding {record:?}");
        let again = decode_record(seq, &buffer).expect("re-encoded record decodes");
        assert_eq!(again, record);
    }

    let frame_len = FRAME_HEADER_BYTES + payload.len();
    if frame_len % 8 == 0 && frame_len >= FRAME_HEADER_BYTES + 40 && frame_len <= MAX_FRAME_BYTES {
        let mut frame = vec![0; frame_len];
        frame[FRAME_HEADER_BYTES..].copy_from_slice(payload);
        let prev_crc = seq as u32 ^ 0x5EED;
        let crc = seal_frame(&mut frame, seq, prev_crc);
        let checked = check_frame(&frame).expect("a sealed frame checks");
        assert_eq!((checked.length, checked.crc, checked.sequence, checked.prev_crc), (frame_len, crc, seq, prev_crc));
    }
});
