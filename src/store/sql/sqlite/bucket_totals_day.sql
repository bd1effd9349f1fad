-- Daily buckets of one account and resource: the folded totals, plus the
-- ledger tail the rollup has not reached yet, grouped the same way. One
-- statement, one snapshot: a concurrent rollup can neither hide nor double a row.
-- {bucket_of_entry}: an entry's UTC day (sqlite.rs, shape).
-- Amounts come in two halves, amount = high * 2^32 + low (>> is an arithmetic
-- shift), joined in 128 bits by Rust: a plain SUM raises as soon as its
-- running sum leaves 64 bits, even when the net fits (PostgreSQL adds a
-- bigint SUM in numeric and answers), so SQLite answered none of it.
SELECT day AS bucket, amount >> 32, amount & 4294967295
FROM daily_totals
WHERE account = ?1 AND resource = ?2 AND day >= ?3 AND day < ?4
UNION ALL
SELECT {bucket_of_entry}, SUM(amount >> 32), SUM(amount & 4294967295)
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND account = ?1 AND resource = ?2 AND occurred_at >= ?5 AND occurred_at < ?6
GROUP BY 1
