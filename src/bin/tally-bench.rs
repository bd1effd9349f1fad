//! `tally-bench`: measures Tally against baselines in the same run.

fn main() {}
