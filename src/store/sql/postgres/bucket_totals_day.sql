-- Daily buckets of one account and resource: the folded totals, plus every
-- committed ledger row past the cursor, grouped the same way. One statement,
-- one snapshot: a concurrent rollup can neither hide nor double a row.
-- Each bucket's sum leaves as NUMERIC text, exact past 64 bits (totals are
-- NUMERIC since migration 0011): Rust names a bucket past them (review AQ;
-- a ::bigint cast raised "bigint out of range", naming none) and takes one
-- that the tail brings back within them, as SQLite does.
SELECT bucket, SUM(amount)::text
FROM (
    SELECT day AS bucket, amount
    FROM daily_totals
    WHERE account = $1 AND resource = $2 AND day >= $3 AND day < $4
    UNION ALL
    SELECT (e.occurred_at AT TIME ZONE 'UTC')::date, SUM(e.amount)
    FROM entries AS e, rollup_cursor AS c
    WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
      AND e.account = $1 AND e.resource = $2 AND e.occurred_at >= $5 AND e.occurred_at < $6
    GROUP BY 1
) AS parts
GROUP BY bucket
ORDER BY bucket
