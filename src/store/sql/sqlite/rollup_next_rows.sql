-- The next ?1 ledger rows past the cursor, each with its UTC day, for the
-- rollup's fold with parts (sqlite.rs, fold_with_parts), which sums them in
-- Rust. Read under the write lock, so the cursor cannot move meanwhile.
-- Seconds are floored, not truncated (SQLite's / rounds toward zero), so an
-- instant before 1970 stays in its own day.
SELECT id, account, resource,
       date((occurred_at - (occurred_at % 1000000 + 1000000) % 1000000) / 1000000, 'unixepoch') AS day,
       amount
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
ORDER BY id
LIMIT ?1
