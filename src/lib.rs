//! Tally: a usage ledger for SaaS products.
//!
//! Services post signed entries into an append-only ledger (`store`), a
//! scheduled rollup folds them into daily and monthly totals (`jobs`), and
//! quota checks, usage views and exports read those totals (`http`, `export`,
//! `cli`). See `docs/architecture.md`.

/// `eprintln!` that ignores a failed write. With stderr a closed pipe
/// (`tally export … 2>&1 | head`), `eprintln!` panics, and the command
/// exits 101 instead of its own code (review AX). Defined before the
/// modules so that every one of them can use it.
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod app;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod domain;
pub mod export;
pub mod http;
pub mod jobs;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod usage;
