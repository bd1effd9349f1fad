-- The unfolded tail of a totals export: committed rows past the rollup cursor
-- with occurred_at in [?1, ?2) (µs), grouped per (account, resource, bucket)
-- and sorted like the folded totals it is merged into (byte order: BINARY
-- collation). Read in the same transaction as the folded totals.
-- ?3/?4 optionally narrow to an account / a resource; {bucket_of_entry} is
-- filled in for day or month.
-- Sums come in two halves, amount = high * 2^32 + low (>> is an arithmetic
-- shift), joined in 128 bits by Rust: a plain SUM raises as soon as its
-- running sum leaves 64 bits, even when the net fits (PostgreSQL adds a
-- bigint SUM in numeric and answers), so SQLite answered none of it.
SELECT account, resource, {bucket_of_entry} AS bucket,
       SUM(amount >> 32) AS high, SUM(amount & 4294967295) AS low, COUNT(*) AS entries
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND occurred_at >= ?1 AND occurred_at < ?2
  AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
GROUP BY account, resource, bucket
ORDER BY account, resource, bucket
