-- What the daily totals should hold: every folded ledger row, grouped afresh.
SELECT e.account, e.resource, (e.occurred_at AT TIME ZONE 'UTC')::date AS bucket,
       SUM(e.amount)::bigint AS amount, COUNT(*) AS entries
FROM entries AS e, rollup_cursor AS c
WHERE c.name = 'rollup' AND (e.tx_id, e.id) <= (c.last_tx, c.last_id)
GROUP BY 1, 2, 3
