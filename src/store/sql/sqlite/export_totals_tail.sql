-- The unfolded tail of a totals export: committed rows past the rollup cursor
-- with occurred_at in [?1, ?2) (µs), grouped per (account, resource, bucket)
-- and sorted like the folded totals it is merged into (byte order: BINARY
-- collation). Read in the same transaction as the folded totals.
-- ?3/?4 optionally narrow to an account / a resource; {bucket_of_entry} is
-- filled in for day or month.
SELECT account, resource, {bucket_of_entry} AS bucket, SUM(amount) AS amount, COUNT(*) AS entries
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND occurred_at >= ?1 AND occurred_at < ?2
  AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
GROUP BY account, resource, bucket
ORDER BY account, resource, bucket
