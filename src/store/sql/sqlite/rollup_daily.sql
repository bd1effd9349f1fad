-- Fold the ledger rows (?1, ?2] into daily totals. SUM over INTEGER is exact
-- and raises on overflow; the bucket is the UTC date of occurred_at (µs).
INSERT INTO daily_totals (account, resource, day, amount, entries)
SELECT account, resource, date(occurred_at / 1000000, 'unixepoch'), SUM(amount), COUNT(*)
FROM entries
WHERE id > ?1 AND id <= ?2
GROUP BY 1, 2, 3
ON CONFLICT (account, resource, day) DO UPDATE
SET amount = amount + excluded.amount,
    entries = entries + excluded.entries
