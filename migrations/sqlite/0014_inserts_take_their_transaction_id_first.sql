-- Mirrors PostgreSQL's 0014, which makes a statement inserting ledger rows
-- take its transaction id before any row's id, for the entries listing's
-- wait. SQLite has one writer at a time, so its ids are in commit order and
-- its listing waits for nothing. This file keeps the two migration folders
-- in step.
SELECT 1;
