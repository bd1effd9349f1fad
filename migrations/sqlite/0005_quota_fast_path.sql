-- Quota fast path. Mirrors the PostgreSQL migration of the same name, which
-- adds the functions `tally_used_settled` and `tally_consume`. SQLite needs no
-- schema change: its settled watermark is a ledger id (one writer, AUTOINCREMENT,
-- so every row up to the largest id a read sees is final), and the index
-- entries_unfolded_tail (account, resource, id, occurred_at, amount) of
-- migration 0004 already range-scans the rows after it.
SELECT 1;
