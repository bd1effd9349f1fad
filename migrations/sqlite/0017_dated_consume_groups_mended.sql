-- PostgreSQL's 0017 mends its dated consume function (a consume left to
-- Rust no longer splits its group; the limit in force now is stored with a
-- recorded dated consume). On SQLite every consume is decided in Rust,
-- which does both already, so there is no SQL to change; this file keeps
-- the two migration folders in step.
SELECT 1;
