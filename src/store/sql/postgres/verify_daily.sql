-- What the daily totals should hold: every folded ledger row, grouped afresh.
-- As text: the NUMERIC sum may pass 64 bits, as a total may (migration 0011).
SELECT e.account, e.resource, (e.occurred_at AT TIME ZONE 'UTC')::date AS bucket,
       SUM(e.amount)::text AS amount, COUNT(*) AS entries
FROM entries AS e, rollup_cursor AS c
WHERE c.name = 'rollup' AND (e.tx_id, e.id) <= (c.last_tx, c.last_id)
GROUP BY 1, 2, 3
