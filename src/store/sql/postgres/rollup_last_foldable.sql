-- The last row after the cursor ($1, $2) whose transaction is below $3 (the
-- xmin of a snapshot), in commit order: one step down entries_tx_id.
SELECT tx_id::text AS last_tx, id AS last_id
FROM entries
WHERE (tx_id, id) > ($1::text::xid8, $2) AND tx_id < $3::text::xid8
ORDER BY tx_id DESC, id DESC
LIMIT 1
