-- Daily buckets of one account and resource: the folded totals, plus every
-- committed ledger row past the cursor, grouped the same way. One statement,
-- one snapshot: a concurrent rollup can neither hide nor double a row.
-- amount::bigint raises on a total past 64 bits (NUMERIC since migration 0011).
SELECT day AS bucket, amount::bigint
FROM daily_totals
WHERE account = $1 AND resource = $2 AND day >= $3 AND day < $4
UNION ALL
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date, SUM(e.amount)::bigint
FROM entries AS e, rollup_cursor AS c
WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
  AND e.account = $1 AND e.resource = $2 AND e.occurred_at >= $5 AND e.occurred_at < $6
GROUP BY 1
