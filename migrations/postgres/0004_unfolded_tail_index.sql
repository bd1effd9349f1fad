-- Quota checks, consume and usage add the ledger rows the rollup has not
-- folded yet ((tx_id, id) past the cursor) for one account and resource.
-- Without this index PostgreSQL walks every row of the account through
-- entries_account_id and filters on tx_id, which grows with the ledger. The
-- INCLUDE columns let the sum run as an index-only scan.
CREATE INDEX entries_unfolded_tail ON entries (account, resource, tx_id, id) INCLUDE (occurred_at, amount);
