-- A consume dated by its caller is held to the limit in force now too.
-- On SQLite every consume is decided in Rust, which does so already, so
-- there is no SQL to change; this file keeps the two migration folders in
-- step (PostgreSQL's 0016 replaces its consume function).
SELECT 1;
