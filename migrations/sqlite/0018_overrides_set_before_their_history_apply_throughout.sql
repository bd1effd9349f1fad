-- Migration 0009 seeded account_override_history with the overrides then
-- set, each as of its updated_at, and since 0012 check, consume, usage and
-- invoices read overrides from that history only. The binaries before 0009
-- applied an override at every instant, so the upgrade moved each existing
-- override's start to its last change: instants before it (consumes it had
-- admitted, months already billed with it) were judged and billed at the
-- plan's limit instead, changing answers already given (review AG). Such a
-- seeded row now starts at the earliest instant Tally takes, 0001-01-01
-- (-62135596800000000 µs since 1970), as a kept default plan does (0015),
-- which gives those answers back.
-- A seeded row is the first row of its (account, resource) made before
-- migration 0009 was recorded: the store appends a change as it is made,
-- after the migrations. SQLite records installed_on to the second
-- (CURRENT_TIMESTAMP, UTC), so "before" reads "before the second after";
-- only an override first set within that second after 0009 ran on a live
-- database could be taken for a seeded one. On a database created with
-- 0009 (or with this migration) there is none.
UPDATE account_override_history
   SET changed_at = -62135596800000000
 WHERE id IN (SELECT min(id) FROM account_override_history GROUP BY account, resource)
   AND changed_at < (SELECT (CAST(strftime('%s', installed_on) AS INTEGER) + 1) * 1000000
                       FROM _sqlx_migrations WHERE version = 9);
