-- The default plan has changed: every account already known that is on the
-- default at some instant gets the previous default ($1) from the start ($2),
-- so that its past (months billed) and its future stay as they were; only
-- accounts new from here on get the new default. "Known": its ledger rows, its
-- plan assignments (one scheduled for later leaves it on the default until
-- then) and its overrides, past ones included. An account with an assignment
-- at or before the start has none of its instants on the default.
INSERT INTO account_plans (account, plan, effective_at, created_at)
SELECT known.account, $1, $2, $3
FROM (
    SELECT account FROM entries
    UNION SELECT account FROM account_plans
    UNION SELECT account FROM account_overrides
    UNION SELECT account FROM account_override_history
) AS known
WHERE NOT EXISTS (
    SELECT 1 FROM account_plans AS assigned
    WHERE assigned.account = known.account AND assigned.effective_at <= $2
)
