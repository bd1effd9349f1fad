-- The newest transaction id the ledger or the rollup cursor holds, and the
-- next one this cluster will assign (pg_snapshot_xmax: asking takes none).
-- Within one cluster the ledger is always behind: a row's tx_id was assigned
-- before the row was written. A pg_dump restored into another cluster
-- carries the old cluster's ids, and the new one may be far behind them:
-- new rows would then sort below the cursor and never be folded nor counted
-- (DESIGN.md, invariant 3). As text: Rust compares them as u64.
SELECT GREATEST(
           -- entries_tx_id (tx_id, id) answers this from its last leaf.
           (SELECT tx_id FROM entries ORDER BY tx_id DESC LIMIT 1),
           (SELECT last_tx FROM rollup_cursor WHERE name = 'rollup'))::text AS newest,
       pg_snapshot_xmax(pg_current_snapshot())::text AS next
