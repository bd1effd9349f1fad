-- Used over all time (a running balance such as storage): every monthly total
-- plus the unfolded tail, in one statement.
SELECT
    COALESCE((SELECT SUM(amount) FROM monthly_totals WHERE account = ?1 AND resource = ?2), 0)
  + COALESCE((
        SELECT SUM(amount) FROM entries
        WHERE account = ?1 AND resource = ?2
          AND id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
    ), 0)
