-- Every override change (set or removed) made at or before $1 (NULL: all), in
-- the order they were made (ties: the later row last). The invoice picks, for
-- each day, the latest change made by the day's closing instant, so a change
-- made after a month never rewrites its bill.
SELECT account, resource, limit_amount, enforcement, limit_window, expires_at,
       changed_at AS updated_at, removed
FROM account_override_history
WHERE $1::timestamptz IS NULL OR changed_at <= $1
ORDER BY account, resource, changed_at, id
