//! Tally: a usage ledger for SaaS products.
//!
//! Services post signed entries into an append-only ledger (`store`), a
//! scheduled rollup folds them into daily and monthly totals (`jobs`), and
//! quota checks, usage views and exports read those totals (`http`, `export`,
//! `cli`). See `docs/architecture.md`.

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
