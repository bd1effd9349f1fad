-- Add the staged monthly sums to the monthly totals, under the write lock,
-- in key order (see rollup_daily.sql).
INSERT INTO monthly_totals (account, resource, month, amount, entries)
SELECT account, resource, month, amount, entries
FROM temp.rollup_months
WHERE true
ON CONFLICT (account, resource, month, part) DO UPDATE
SET amount = amount + excluded.amount,
    entries = entries + excluded.entries
