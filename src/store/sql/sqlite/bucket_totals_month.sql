-- Monthly buckets of one account and resource: folded totals plus the unfolded
-- tail, in one statement (one snapshot).
-- Seconds are floored, not truncated (SQLite's / rounds toward zero), so an
-- instant before 1970 stays in its own day.
SELECT month AS bucket, amount
FROM monthly_totals
WHERE account = ?1 AND resource = ?2 AND month >= ?3 AND month < ?4
UNION ALL
SELECT strftime('%Y-%m-01', (occurred_at - (occurred_at % 1000000 + 1000000) % 1000000) / 1000000, 'unixepoch'), SUM(amount)
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND account = ?1 AND resource = ?2 AND occurred_at >= ?5 AND occurred_at < ?6
GROUP BY 1
