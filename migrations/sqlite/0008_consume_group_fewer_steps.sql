-- Consume groups do less work per consume. Mirrors the PostgreSQL migration
-- of the same name, which replaces `tally_consume_group`. SQLite decides each
-- consume alone under BEGIN IMMEDIATE; it needs no schema change.
SELECT 1;
