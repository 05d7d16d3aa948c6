-- When each metric point arrived at the driver (seconds since 1970, UTC),
-- so that curves can be drawn against wall-clock time as well as steps.
-- NULL for points recorded before this column existed or rebuilt by
-- `registry recover` (the artifact store keeps steps, not times).
ALTER TABLE metrics ADD COLUMN at REAL;
