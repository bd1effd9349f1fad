-- The next ?1 ledger rows past the cursor, each with its UTC day, for the
-- rollup's fold with parts (sqlite.rs, fold_with_parts), which sums them in
-- Rust. Read under the write lock, so the cursor cannot move meanwhile.
-- {bucket_of_entry}: an entry's UTC day (sqlite.rs, shape).
SELECT id, account, resource,
       {bucket_of_entry} AS day,
       amount
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
ORDER BY id
LIMIT ?1
