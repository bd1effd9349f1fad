-- Sum the staged days into months, still outside the write lock. Reads
-- rollup_days in its key order, so the GROUP BY needs no sort.
INSERT INTO temp.rollup_months (account, resource, month, amount, entries)
SELECT account, resource, month, SUM(amount), SUM(entries)
FROM temp.rollup_days
GROUP BY account, resource, month
