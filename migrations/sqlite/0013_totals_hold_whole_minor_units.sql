-- Totals hold whole minor units. On SQLite their amount is an INTEGER column
-- of a STRICT table (0011), which already refuses anything else; PostgreSQL's
-- 0013 adds the check its NUMERIC column needs. This file keeps the two
-- migration folders in step.
SELECT 1;
