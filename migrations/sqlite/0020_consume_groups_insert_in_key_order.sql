-- PostgreSQL's 0020 makes a consume group insert its rows in (account, key)
-- order, as batches do, so the two cannot deadlock. SQLite takes one write
-- transaction at a time and never deadlocks on row locks: there is nothing
-- to change; this file keeps the two migration folders in step.
SELECT 1;
