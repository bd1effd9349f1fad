-- Add the staged daily sums to the daily totals, under the write lock. Rows
-- come in key order (rollup_days' primary key), so each page of the totals
-- is visited once. `WHERE true` tells the parser that ON CONFLICT belongs to
-- the INSERT, not to a join. Rows go to part 0 (migration 0011). A sum past
-- 64 bits becomes REAL, which the STRICT INTEGER column refuses: an error,
-- never a wrap or a rounding, after which the rollup folds the batch again
-- with parts (sqlite.rs, fold_with_parts).
INSERT INTO daily_totals (account, resource, day, amount, entries)
SELECT account, resource, day, amount, entries
FROM temp.rollup_days
WHERE true
ON CONFLICT (account, resource, day, part) DO UPDATE
SET amount = amount + excluded.amount,
    entries = entries + excluded.entries
