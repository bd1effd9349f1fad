-- Monthly buckets of one account and resource: folded totals plus the unfolded
-- tail, in one statement (one snapshot).
-- {bucket_of_entry}: an entry's UTC month (sqlite.rs, shape).
-- Amounts come in two halves, amount = high * 2^32 + low (>> is an arithmetic
-- shift), joined in 128 bits by Rust: a plain SUM raises as soon as its
-- running sum leaves 64 bits, even when the net fits (PostgreSQL adds a
-- bigint SUM in numeric and answers), so SQLite answered none of it.
SELECT month AS bucket, amount >> 32, amount & 4294967295
FROM monthly_totals
WHERE account = ?1 AND resource = ?2 AND month >= ?3 AND month < ?4
UNION ALL
SELECT {bucket_of_entry}, SUM(amount >> 32), SUM(amount & 4294967295)
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND account = ?1 AND resource = ?2 AND occurred_at >= ?5 AND occurred_at < ?6
GROUP BY 1
