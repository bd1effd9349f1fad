-- Monthly buckets of one account and resource: folded totals plus the unfolded
-- tail, in one statement (one snapshot). Each bucket's sum leaves as NUMERIC
-- text, exact past 64 bits, for Rust to name one past them (see
-- bucket_totals_day.sql).
SELECT bucket, SUM(amount)::text
FROM (
    SELECT month AS bucket, amount
    FROM monthly_totals
    WHERE account = $1 AND resource = $2 AND month >= $3 AND month < $4
    UNION ALL
    SELECT date_trunc('month', e.occurred_at AT TIME ZONE 'UTC')::date, SUM(e.amount)
    FROM entries AS e, rollup_cursor AS c
    WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
      AND e.account = $1 AND e.resource = $2 AND e.occurred_at >= $5 AND e.occurred_at < $6
    GROUP BY 1
) AS parts
GROUP BY bucket
ORDER BY bucket
