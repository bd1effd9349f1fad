-- PostgreSQL's 0019 makes its consume functions stamp `recorded_at` with the
-- instant Tally passes (the process's clock) instead of the server's now().
-- SQLite's rows are stamped by the process already, so there is nothing to
-- change; this file keeps the two migration folders in step.
SELECT 1;
