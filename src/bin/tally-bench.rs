//! `tally-bench`: measures Tally against plain-database baselines in the same
//! run (`tally-bench ingest --help`). Everything lives in `tally::bench`.

fn main() -> std::process::ExitCode {
    tally::bench::main()
}
