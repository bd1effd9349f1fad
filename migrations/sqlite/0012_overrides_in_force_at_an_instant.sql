-- The override in force at an instant decides that instant's limits (the
-- latest change to it made by then, from account_override_history, 0009).
-- On SQLite every consume is decided in Rust, which reads that history
-- (`overrides_as_of`), so there is no SQL to change; this file keeps the
-- two migration folders in step (PostgreSQL's 0012 replaces its consume
-- function).
SELECT 1;
