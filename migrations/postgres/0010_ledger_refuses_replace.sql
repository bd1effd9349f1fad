-- Mirrors SQLite's 0010, which stops INSERT OR REPLACE from rewriting an
-- entry behind the UPDATE and DELETE triggers. PostgreSQL has no REPLACE:
-- its upsert (ON CONFLICT DO UPDATE) fires 0001's UPDATE trigger and is
-- refused, so there is nothing to add here.
SELECT 1;
