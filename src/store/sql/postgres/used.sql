-- Used in one period: the folded total of its bucket plus every committed
-- ledger row past the cursor, in one statement (one snapshot: the tail
-- function is STABLE), so a concurrent rollup can neither hide nor double a
-- row. $3 is the bucket date, $4/$5 the period, $6 picks the table: 'day' or
-- 'month'. tally_unfolded_sum (migration 0004) range-scans the tail.
SELECT (
    COALESCE(CASE $6::text
        WHEN 'day' THEN (SELECT amount FROM daily_totals WHERE account = $1 AND resource = $2 AND day = $3)
        ELSE (SELECT amount FROM monthly_totals WHERE account = $1 AND resource = $2 AND month = $3)
    END, 0)
  + tally_unfolded_sum($1, $2, $4, $5)
)::bigint
