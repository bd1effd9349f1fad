-- Quota checks, consume and usage add the ledger rows the rollup has not
-- folded yet (id past the cursor) for one account and resource. This index
-- finds exactly those rows and covers what the sum reads (occurred_at,
-- amount), so a check costs the tail of one (account, resource), not of the
-- whole account.
CREATE INDEX entries_unfolded_tail ON entries (account, resource, id, occurred_at, amount);
