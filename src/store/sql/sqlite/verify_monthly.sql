-- What the monthly totals should hold: every folded ledger row, grouped afresh.
-- Seconds are floored, not truncated (SQLite's / rounds toward zero), so an
-- instant before 1970 stays in its own day.
SELECT account, resource, strftime('%Y-%m-01', (occurred_at - (occurred_at % 1000000 + 1000000) % 1000000) / 1000000, 'unixepoch') AS bucket,
       SUM(amount) AS amount, COUNT(*) AS entries
FROM entries
WHERE id <= (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
GROUP BY 1, 2, 3
