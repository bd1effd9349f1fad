-- Consume groups do less work per consume. Mirrors the PostgreSQL migration
-- of the same name, which replaces `tally_consume_group` (SQLite decides each
-- consume alone under BEGIN IMMEDIATE: nothing to replace) and gives the
-- plan-in-force lookup an index in its sort order, so the latest assignment
-- by (effective_at, created_at, id) is read without sorting the account's
-- assignments. It starts with account_plans_by_account's columns, which goes.
CREATE INDEX account_plans_in_force ON account_plans (account, effective_at, created_at, id);
DROP INDEX account_plans_by_account;
