-- Daily buckets of one account and resource: the folded totals, plus the
-- ledger tail the rollup has not reached yet, grouped the same way. One
-- statement, one snapshot: a concurrent rollup can neither hide nor double a row.
-- Seconds are floored, not truncated (SQLite's / rounds toward zero), so an
-- instant before 1970 stays in its own day.
SELECT day AS bucket, amount
FROM daily_totals
WHERE account = ?1 AND resource = ?2 AND day >= ?3 AND day < ?4
UNION ALL
SELECT date((occurred_at - (occurred_at % 1000000 + 1000000) % 1000000) / 1000000, 'unixepoch'), SUM(amount)
FROM entries
WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
  AND account = ?1 AND resource = ?2 AND occurred_at >= ?5 AND occurred_at < ?6
GROUP BY 1
