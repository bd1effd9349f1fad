-- Consume in groups. Mirrors the PostgreSQL migration of the same name, which
-- replaces the function `tally_consume` by `tally_consume_group` (the consumes
-- waiting at one instant decided in one transaction). SQLite has one writer and
-- consumes under BEGIN IMMEDIATE; it needs no schema change.
SELECT 1;
