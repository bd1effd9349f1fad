-- The last row of the next batch: the $4-th row after the cursor ($1, $2) in
-- commit order, taking only rows whose transaction is below $3, the xmin of a
-- snapshot, so every such transaction has finished and no earlier row can
-- still appear. An index-only walk of at most $4 entries; nothing is
-- materialised. No row: fewer than $4 remain, and the batch is all of them
-- (rollup_last_foldable.sql).
SELECT tx_id::text AS last_tx, id AS last_id
FROM entries
WHERE (tx_id, id) > ($1::text::xid8, $2) AND tx_id < $3::text::xid8
ORDER BY tx_id, id
OFFSET $4 - 1
LIMIT 1
