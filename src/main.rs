//! The `tally` binary: everything lives in the library; see `tally::cli`.

fn main() -> std::process::ExitCode {
    tally::cli::main()
}
