-- Monthly buckets of one account and resource: folded totals plus the unfolded
-- tail, in one statement (one snapshot).
-- {bucket_of_entry}: an entry's UTC month (sqlite.rs, shape).
SELECT month AS bucket, amount
FROM monthly_totals
WHERE account = ?1 AND resource = ?2 AND month >= ?3 AND month < ?4
UNION ALL
SELECT {bucket_of_entry}, SUM(amount)
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND account = ?1 AND resource = ?2 AND occurred_at >= ?5 AND occurred_at < ?6
GROUP BY 1
