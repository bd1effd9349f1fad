//! Black-box tests: the real app on port 0, a fresh database per test, real
//! HTTP. Every test runs on SQLite and on PostgreSQL (see `helpers::both`).

mod helpers;

mod auth;
mod availability;
mod cli;
mod concurrency;
mod entries;
mod export;
mod invariants;
mod invoice;
mod jobs;
mod messages;
mod migrations;
mod quota;
mod restore;
mod rollup;
mod serve;
mod shapes;
mod timeseries;
mod tls;
mod validation;
