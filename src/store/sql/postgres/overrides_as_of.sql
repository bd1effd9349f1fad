-- Every override as it was at $1: per (account, resource) the latest change
-- made at or before $1 (ties: the later row), unless that change removed it.
SELECT account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at
FROM (
    SELECT account, resource, limit_amount, enforcement, limit_window, expires_at,
           changed_at AS updated_at, removed,
           row_number() OVER (PARTITION BY account, resource ORDER BY changed_at DESC, id DESC) AS newest
    FROM account_override_history
    WHERE changed_at <= $1
) AS history
WHERE newest = 1 AND NOT removed
ORDER BY account, resource
