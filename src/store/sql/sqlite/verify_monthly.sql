-- What the monthly totals should hold: every folded ledger row, grouped afresh.
SELECT account, resource, strftime('%Y-%m-01', occurred_at / 1000000, 'unixepoch') AS bucket,
       SUM(amount) AS amount, COUNT(*) AS entries
FROM entries
WHERE id <= (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
GROUP BY 1, 2, 3
