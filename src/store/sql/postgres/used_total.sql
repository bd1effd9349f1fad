-- Used over all time (a running balance such as storage): every monthly total
-- plus the unfolded tail, in one statement (one snapshot: the tail function
-- is STABLE). tally_unfolded_sum (migration 0004) range-scans the tail.
SELECT (
    COALESCE((SELECT SUM(amount) FROM monthly_totals WHERE account = $1 AND resource = $2), 0)
  + tally_unfolded_sum($1, $2, '-infinity', 'infinity')
)::bigint
