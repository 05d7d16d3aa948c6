-- Experiments: a run's name, note, tags and command-line overrides, and a
-- view that gives every run's stages with the stage run behind each one's
-- artifact (cached stages included), so that comparing runs is one SELECT.

ALTER TABLE runs ADD COLUMN name TEXT;       -- `run --name`: unique in the workspace
ALTER TABLE runs ADD COLUMN note TEXT;       -- `run --note`
ALTER TABLE runs ADD COLUMN overrides TEXT NOT NULL DEFAULT '[]';  -- JSON list of the `-S PATH=VALUE` given
CREATE UNIQUE INDEX runs_name ON runs (name) WHERE name IS NOT NULL;

CREATE TABLE run_tags (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    tag    TEXT    NOT NULL,
    PRIMARY KEY (run_id, tag)
) WITHOUT ROWID;
CREATE INDEX run_tags_tag ON run_tags (tag);

-- Per run and stage (its last attempt in that run): the status there and
-- `producer`, the stage run that made the artifact it used (itself when it
-- ran, an earlier run's when cached; itself when there is no artifact).
-- Params and metrics hang off the producer:  SELECT rs.run_id, p.name, p.value FROM run_stages rs
--            JOIN params p ON p.stage_run_id = rs.producer WHERE rs.stage = 'vq1'
CREATE VIEW run_stages AS
SELECT s.run_id, s.stage, s.kind, s.status, s.key,
       COALESCE((SELECT a.stage_run_id FROM artifacts a WHERE a.key = s.key), s.id) AS producer
FROM stage_runs s
WHERE s.id = (SELECT max(t.id) FROM stage_runs t WHERE t.run_id = s.run_id AND t.stage = s.stage);
