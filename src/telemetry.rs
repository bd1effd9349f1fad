//! Logs and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sets up `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    // A second init (tests) is harmless; ignore it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    entries_ingested: AtomicU64,
}

impl Metrics {
    /// Counts newly created ledger rows.
    pub fn entries_ingested(&self, n: u64) {
        self.entries_ingested.fetch_add(n, Ordering::Relaxed);
    }

    /// Ledger rows created by this process.
    pub fn entries_ingested_total(&self) -> u64 {
        self.entries_ingested.load(Ordering::Relaxed)
    }
}
