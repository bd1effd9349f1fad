-- Totals per (account, resource, bucket) in [?1, ?2) (bucket dates) for an
-- export: the folded totals plus the unfolded tail grouped the same way, in
-- one statement, so the file is exact at the moment it is read. ?5/?6 bound
-- occurred_at in µs; ?3/?4 optionally narrow to an account / a resource.
-- {table}, {bucket} and {bucket_of_entry} are filled in for day or month.
-- Sums come in two halves, amount = high * 2^32 + low (>> is an arithmetic
-- shift), joined in 128 bits by Rust: a plain SUM raises as soon as its
-- running sum leaves 64 bits, even when the net fits (PostgreSQL adds a
-- bigint SUM in numeric and answers), so SQLite answered none of it.
SELECT account, resource, bucket,
       SUM(amount >> 32) AS high, SUM(amount & 4294967295) AS low, SUM(entries) AS entries
FROM (
    SELECT account, resource, {bucket} AS bucket, amount, entries
    FROM {table}
    WHERE {bucket} >= ?1 AND {bucket} < ?2
      AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
    UNION ALL
    SELECT account, resource, {bucket_of_entry}, amount, 1
    FROM entries
    WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
      AND occurred_at >= ?5 AND occurred_at < ?6
      AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
)
GROUP BY account, resource, bucket
ORDER BY account, resource, bucket
