//! Build script: rebuilds the crate when a migration is added or changed.
//!
//! `sqlx::migrate!` embeds `migrations/sqlite` and `migrations/postgres` at
//! compile time, but Cargo reruns a macro only when a source file it knows
//! of changes. A new migration is a new file, so without this an incremental
//! build (and the test suite) keeps migrating to the schema of the previous
//! build. This is the build script `sqlx migrate build-script` writes; it
//! lives in `src/` to keep the top level to the files the project fixes.

fn main() {
    // A directory is scanned whole: any file added, removed or changed in it
    // or below it reruns the build.
    println!("cargo:rerun-if-changed=migrations");
}
