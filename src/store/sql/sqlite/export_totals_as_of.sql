-- Totals as the ledger stood at recorded time ?7: recomputed from the entries
-- recorded by then (the stored totals already include later ones), so an
-- export or invoice can be reproduced exactly after late entries arrive.
-- Sums come in two halves, amount = high * 2^32 + low (>> is an arithmetic
-- shift), joined in 128 bits by Rust: a plain SUM raises as soon as its
-- running sum leaves 64 bits, even when the net fits (PostgreSQL adds a
-- bigint SUM in numeric and answers), so SQLite answered none of it.
SELECT account, resource, {bucket_of_entry} AS bucket,
       SUM(amount >> 32) AS high, SUM(amount & 4294967295) AS low, COUNT(*) AS entries
FROM entries
WHERE recorded_at <= ?7
  AND occurred_at >= ?5 AND occurred_at < ?6
  AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
  AND ?1 IS NOT NULL AND ?2 IS NOT NULL
GROUP BY account, resource, bucket
ORDER BY account, resource, bucket
