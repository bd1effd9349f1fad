//! Test and benchmark support: real databases, no mocks.

pub mod pg_cluster;
