-- Migration 0009 seeded account_override_history with the overrides then
-- set, each as of its updated_at, and since 0012 check, consume, usage and
-- invoices read overrides from that history only. The binaries before 0009
-- applied an override at every instant, so the upgrade moved each existing
-- override's start to its last change: instants before it (consumes it had
-- admitted, months already billed with it) were judged and billed at the
-- plan's limit instead, changing answers already given (review AG). Such a
-- seeded row now starts at the earliest instant Tally takes, 0001-01-01, as
-- a kept default plan does (0015), which gives those answers back.
-- A seeded row is the first row of its (account, resource) made before
-- migration 0009 was recorded: the store appends a change as it is made,
-- after the migrations, and 0009's installed_on is the start of the
-- transaction that seeded them. On a database created with 0009 (or with
-- this migration) there is none.
UPDATE account_override_history AS h
   SET changed_at = TIMESTAMPTZ '0001-01-01 00:00:00+00'
 WHERE h.id = (SELECT min(f.id) FROM account_override_history AS f
                WHERE f.account = h.account AND f.resource = h.resource)
   AND h.changed_at < (SELECT m.installed_on FROM _sqlx_migrations AS m WHERE m.version = 9);
