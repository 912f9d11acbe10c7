//! Prometheus text metrics kept in plain atomics (no global registry, no allocation per request).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::api::routes::ROUTES;

/// Every status the server answers with has its own label (`other` is for none of them).
const STATUSES: [u16; 16] = [
    200, 201, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 503, 507, 500,
];
const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

pub struct Metrics {
    requests: Vec<AtomicU64>,
    latency_buckets: Vec<AtomicU64>,
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    /// Event-stream requests answered by reading the journal files (older than the window).
    pub events_journal_reads: AtomicU64,
    /// Bytes those requests read from the journal files.
    pub events_journal_bytes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: (0..(ROUTES.len() + 1) * (STATUSES.len() + 1))
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency_buckets: (0..BUCKETS_US.len() + 1)
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency_sum_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            events_journal_reads: AtomicU64::new(0),
            events_journal_bytes: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// `route` is an index into `ROUTES`, or `ROUTES.len()` for unmatched paths.
    pub fn record(&self, route: usize, status: u16, latency_us: u64) {
        let status_index = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.requests[route.min(ROUTES.len()) * (STATUSES.len() + 1) + status_index]
            .fetch_add(1, Ordering::Relaxed);
        let bucket = BUCKETS_US
            .iter()
            .position(|b| latency_us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, series: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP wallet_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE wallet_http_requests_total counter\n");
        for (r, route) in ROUTES
            .iter()
            .map(|r| r.name)
            .chain(std::iter::once("unmatched"))
            .enumerate()
        {
            for (s, status) in STATUSES
                .iter()
                .map(|s| s.to_string())
                .chain(std::iter::once("other".into()))
                .enumerate()
            {
                let v = self.requests[r * (STATUSES.len() + 1) + s].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "wallet_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {v}"
                    );
                }
            }
        }
        out.push_str("# HELP wallet_http_request_duration_seconds Request latency.\n");
        out.push_str("# TYPE wallet_http_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "wallet_http_request_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        cumulative += self.latency_buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "wallet_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "wallet_http_request_duration_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "wallet_http_request_duration_seconds_count {}",
            self.latency_count.load(Ordering::Relaxed)
        );
        for (name, help, value) in series {
            // Counters (only ever rising within a process) are named `_total`; the rest are
            // gauges.
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

/// Journal positions (`TailPosition`s by their next sequence) an event-stream read from the
/// journal resumes at, the nearest at or before where it starts: where earlier reads ended
/// (bounded: the oldest go first, as consumers move forward), and an index of the journal:
/// positions the read views' rebuild passed before the start (about one per 65,536 events),
/// and those a read from the journal passed on its way to where it started (one per
/// `EVENTS_INDEX_EVERY` events of the routes, 16,384), some 80 bytes each in the map: at most
/// about 1 MB for 50 M transfers.
#[derive(Default)]
pub struct TailPositions {
    positions:
        std::sync::Mutex<std::collections::BTreeMap<u64, crate::journal::tail::TailPosition>>,
    indexed: std::sync::Mutex<std::collections::BTreeMap<u64, crate::journal::tail::TailPosition>>,
}

impl TailPositions {
    /// How many positions of earlier reads are kept.
    pub const CAPACITY: usize = 4096;

    /// The position with the highest sequence at or before `seq`.
    pub fn nearest(&self, seq: u64) -> Option<crate::journal::tail::TailPosition> {
        let read = {
            let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
            positions.range(..=seq).next_back().map(|(_, p)| *p)
        };
        let indexed = {
            let indexed = self.indexed.lock().unwrap_or_else(|e| e.into_inner());
            indexed.range(..=seq).next_back().map(|(_, p)| *p)
        };
        match (read, indexed) {
            (Some(a), Some(b)) => Some(if a.next_seq >= b.next_seq { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    pub fn remember(&self, found: &[crate::journal::tail::TailPosition]) {
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        for position in found {
            positions.insert(position.next_seq, *position);
        }
        while positions.len() > Self::CAPACITY {
            positions.pop_first();
        }
    }

    /// Keeps `passed` for good: each is a verified record boundary of a durable journal that
    /// the writer only appends to (a journal replaced under a running server fails such a read,
    /// as it does any read resumed at an earlier read's end).
    pub fn index(&self, passed: &[crate::journal::tail::TailPosition]) {
        let mut indexed = self.indexed.lock().unwrap_or_else(|e| e.into_inner());
        for position in passed {
            indexed.insert(position.next_seq, *position);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each status the server answers with (the OpenAPI document's responses, 401 and 405 from
    /// its description, 507 for a full ledger or disk) is counted under its own label: a
    /// dashboard must tell a full disk (507) from a wrong method (405).
    #[test]
    fn every_status_the_server_answers_has_its_own_label() {
        let spec = include_str!("../../docs/openapi.yaml");
        let mut documented: Vec<u16> = spec
            .lines()
            .filter_map(|line| {
                let key = line.trim_start().strip_prefix('\'')?;
                let (code, rest) = key.split_once('\'')?;
                rest.starts_with(':').then(|| code.parse().ok())?
            })
            .collect();
        assert!(
            documented.contains(&422),
            "the spec's responses were not found"
        );
        documented.extend([401, 405, 507]);
        let metrics = Metrics::default();
        for status in &documented {
            metrics.record(0, *status, 10);
        }
        let text = metrics.render(&[]);
        for status in &documented {
            assert!(
                text.contains(&format!("status=\"{status}\"")),
                "{status} is not counted under its own label:\n{text}"
            );
        }
        assert!(!text.contains("status=\"other\""), "{text}");
    }
}
