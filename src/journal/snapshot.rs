//! Snapshot files: the encoded ledger at a sequence, written atomically (temporary file, fsync,
//! rename, fsync the directory) and named by the sequence they were taken at.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::core::codec::{DecodeError, prepare_snapshot, snapshot_next_seq};
use crate::core::{Ledger, LedgerConfig};
use crate::journal::storage::fsync_dir;

pub fn snapshot_file_name(next_seq: u64) -> String {
    format!("snapshot-{next_seq:020}.bin")
}

fn parse_snapshot_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".bin")?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok()
}

/// Writes `bytes` (from `encode_snapshot`) as the snapshot at its sequence; returns the path.
pub fn write_snapshot(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let next_seq =
        snapshot_next_seq(bytes).ok_or_else(|| std::io::Error::other("not a snapshot"))?;
    crate::journal::storage::create_dir_all_durable(dir)?;
    let path = dir.join(snapshot_file_name(next_seq));
    let temporary = dir.join(format!(".{}.tmp", snapshot_file_name(next_seq)));
    let written = File::create(&temporary).and_then(|mut file| {
        write_paced(&mut file, bytes)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&temporary, &path)) {
        // A part-written file on a full disk would keep it full: the next segment could not be
        // allocated and the engine would stop, for a snapshot it can do without. (A crash's
        // leftover is removed by the next successful snapshot's `prune`.)
        let _ = fs::remove_file(&temporary);
        return Err(e);
    }
    fsync_dir(dir)?;
    Ok(path)
}

/// Bytes written between two waits for writeback.
const PACE_BYTES: usize = 8 << 20;

/// Writes `bytes` in pieces, starting the writeback of each piece and waiting for the previous
/// one's, so that at most two pieces are dirty at a time. A snapshot is hundreds of megabytes:
/// written at once and then fsync'd, it sat in the page cache and then went to the disk in one
/// burst, and every journal sync of that moment waited behind it (measured: p99 request latency
/// 126 ms while snapshots were written, 2.6 ms without). The final `sync_all` still makes the
/// file durable; the pacing is a hint (its errors are ignored, the `sync_all` reports them).
fn write_paced(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut offset = 0usize;
    for piece in bytes.chunks(PACE_BYTES) {
        file.write_all(piece)?;
        // SAFETY: sync_file_range takes the descriptor of a file we own and plain integers; it
        // reads no memory of ours.
        unsafe {
            libc::sync_file_range(
                fd,
                offset as libc::off64_t,
                piece.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
            if offset >= PACE_BYTES {
                libc::sync_file_range(
                    fd,
                    (offset - PACE_BYTES) as libc::off64_t,
                    PACE_BYTES as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
        }
        offset += piece.len();
    }
    Ok(())
}

/// Right after the snapshot at `written` (a sequence) was written: removes all but the newest
/// `keep` snapshots at or below it (it is always kept), and the temporary files of snapshots
/// whose writing was interrupted (a crash: never loaded, and each as large as a snapshot).
/// Snapshots above it are left alone and not counted: start-up skipped them (damaged), so they
/// are for an operator to look at, and must not push out the good ones. Call it with no snapshot
/// being written into `dir`. Returns what it removed. Without it a server with
/// `--snapshot-every` fills its disk.
pub fn prune(dir: &Path, written: u64, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let older = list_snapshots(dir)
        .into_iter()
        .filter(|(seq, _)| *seq <= written)
        .skip(keep.max(1));
    for (_, path) in older {
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            // Removed by someone else meanwhile: that is what was wanted.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let unfinished = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('.')?.strip_suffix(".tmp"))
            .is_some_and(|n| parse_snapshot_file_name(n).is_some());
        if unfinished {
            match fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

/// Snapshot files in `dir`, newest first.
pub fn list_snapshots(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(parse_snapshot_file_name)
                .map(|s| (s, e.path()))
        })
        .collect();
    out.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    out
}

/// Maps a snapshot file read-only. Reading a multi-GiB snapshot into a `Vec` made the kernel
/// zero and then copy every page of it; mapped, the decoder reads the page cache directly.
fn map_snapshot(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let file = File::open(path)?;
    // SAFETY: snapshot files are written whole under a temporary name and renamed into place;
    // nothing writes to or truncates a published snapshot, so the mapping's bytes do not change
    // while it is alive. The loader relies on that beyond memory safety: the decoder and the
    // checksum/digest helper read the same bytes separately (`decode_side_by_side`), and only
    // unchanging bytes make what one decoded equal to what the other verified.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    populate(&map)?;
    Ok(map)
}

/// Faults every page of a snapshot's mapping in before anything reads it, so that a page the
/// kernel cannot read (an I/O error, a file cut shorter since it was mapped) is this error,
/// and the snapshot is skipped as unreadable, instead of a SIGBUS that kills the process at
/// the decoder's first touch of it. (A page reclaimed and read again later can still fail that
/// way; this closes the window at load, where a damaged disk shows first.) On a kernel without
/// `MADV_POPULATE_READ` (before 5.14: `EINVAL`) the pages are faulted in as they are read.
fn populate(map: &memmap2::Mmap) -> std::io::Result<()> {
    if map.is_empty() {
        return Ok(());
    }
    crate::journal::storage::populated(map.advise(memmap2::Advice::PopulateRead), || {
        "its pages".to_string()
    })
}

/// `codec::decode_snapshot` on two threads. Once the file's checksum holds (checked first:
/// its header sizes the tables), the decoder fills the prepared ledger; beside it, a helper
/// populates the memory the remembered ids will fill, their index table and their blocks (so
/// that the kernel zeroes those pages on the other core, ahead of the decoder, instead of on
/// first touch), then computes the ids' digest. The ledger is trusted only once both are done
/// and agree.
fn decode_side_by_side(bytes: &[u8], config: LedgerConfig) -> Result<Ledger, DecodeError> {
    let (mut decoded, checksummed) = prepare_snapshot(bytes, config)?;
    // The id table first: the decoder starts inserting into it (at random places) as soon as
    // the accounts are done; the id blocks it fills front to back.
    let mut reserved = vec![decoded.ledger().id_table_memory()];
    reserved.extend(decoded.ledger().reserved_id_memory());
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("snapshot-check".into())
            .spawn_scoped(scope, || {
                // SAFETY: the ranges are the id table and id blocks of `decoded`'s ledger,
                // which nothing frees or moves while this scope runs: the decoder only fills
                // them (never beyond the capacity the header's counts reserved).
                unsafe { crate::alloc::populate(&reserved, |_| true) };
                checksummed.digest_ids()
            });
        let structure = decoded.decode(bytes);
        let checks = match helper {
            Ok(handle) => handle
                .join()
                .map_err(|_| DecodeError::Snapshot("the checksum thread panicked"))?,
            // No thread to spare: check here (the memory is touched as it is filled).
            Err(_) => checksummed.digest_ids(),
        };
        let checks = checks?;
        structure?;
        decoded.finish(checks)
    })
}

/// Loads the newest snapshot that decodes and verifies, skipping (with a warning) any that do
/// not. `at_most` bounds its sequence (a caller that wants the state at an earlier point).
pub fn load_newest(dir: &Path, config: LedgerConfig, at_most: Option<u64>) -> Option<Ledger> {
    load_newest_snapshot(dir, config, at_most).map(|loaded| loaded.ledger)
}

/// A snapshot loaded by `load_newest_snapshot`.
pub struct LoadedSnapshot {
    pub ledger: Ledger,
    /// The journal chain value it was written at (`codec::snapshot_chain`), if it names one.
    pub chain: Option<u32>,
    pub path: PathBuf,
}

/// `load_newest`, with the snapshot's file and journal chain value.
pub fn load_newest_snapshot(
    dir: &Path,
    config: LedgerConfig,
    at_most: Option<u64>,
) -> Option<LoadedSnapshot> {
    load_newest_snapshot_noting(dir, config, at_most, &mut Vec::new())
}

/// `load_newest_snapshot`, adding to `skipped` each newer snapshot file it passed over as
/// invalid or unreadable, with the reason (what an audit reports).
pub fn load_newest_snapshot_noting(
    dir: &Path,
    config: LedgerConfig,
    at_most: Option<u64>,
    skipped: &mut Vec<String>,
) -> Option<LoadedSnapshot> {
    for (seq, path) in list_snapshots(dir) {
        if at_most.is_some_and(|limit| seq > limit) {
            tracing::debug!(file = %path.display(), "skipping a snapshot past the sequence asked for");
            continue;
        }
        match map_snapshot(&path) {
            Ok(bytes) => match decode_side_by_side(&bytes, config) {
                // The name is what `at_most` and the callers' checks go by: a snapshot whose
                // header says another sequence (renamed by hand) is not trusted.
                Ok(ledger) if ledger.next_seq() != seq => {
                    tracing::warn!(
                        file = %path.display(),
                        header_next_seq = ledger.next_seq(),
                        "skipping a snapshot whose name disagrees with its header"
                    );
                    skipped.push(format!(
                        "{}: its header says next sequence {}",
                        path.display(),
                        ledger.next_seq()
                    ));
                }
                Ok(ledger) => {
                    return Some(LoadedSnapshot {
                        ledger,
                        chain: crate::core::codec::snapshot_chain(&bytes),
                        path,
                    });
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an invalid snapshot");
                    skipped.push(format!("{}: invalid: {e}", path.display()));
                }
            },
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable snapshot");
                skipped.push(format!("{}: unreadable: {e}", path.display()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot that cannot be written (a full disk) leaves no part-written file behind.
    #[test]
    fn a_failed_write_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(LedgerConfig::default());
        let bytes = crate::core::codec::encode_snapshot(&ledger, None);
        let next_seq = snapshot_next_seq(&bytes).unwrap();
        let temporary = dir
            .path()
            .join(format!(".{}.tmp", snapshot_file_name(next_seq)));
        // Writes through this name fail as on a full disk.
        std::os::unix::fs::symlink("/dev/full", &temporary).unwrap();
        let err = write_snapshot(dir.path(), &bytes).expect_err("written to a full disk");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(
            fs::symlink_metadata(&temporary).is_err(),
            "the temporary file was left behind"
        );
        assert!(list_snapshots(dir.path()).is_empty());
    }

    #[test]
    fn a_mapping_whose_pages_cannot_be_read_is_an_error_not_a_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(snapshot_file_name(7));
        fs::write(&path, vec![0xA5u8; 1 << 20]).unwrap();
        let map = map_snapshot(&path).unwrap();
        assert_eq!(map[(1 << 20) - 1], 0xA5);
        drop(map);

        let file = File::open(&path).unwrap();
        // SAFETY: the test owns the file; it is cut short below on purpose, and nothing reads
        // the mapping's bytes after that except `populate`, which must not touch them.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // The pages past the new end would SIGBUS on a read; populating them reports it.
        let err = populate(&map).expect_err("pages past the end of the file populated");
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }
}
