-- Sweeps: one run of a pipeline over several values of its vars (`sweep:`,
-- `run --sweep`). The run holds one copy of each stage per distinct stage
-- key; these tables say which copy each member's stage is, so that a
-- member's params and metrics are one join away.

ALTER TABLE runs ADD COLUMN swept TEXT;  -- JSON list of the swept vars; NULL when not a sweep

CREATE TABLE sweep_members (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    member INTEGER NOT NULL,   -- 0, 1, ... in the sweep's order
    vars   TEXT    NOT NULL,   -- JSON object: the member's values of the swept vars
    PRIMARY KEY (run_id, member)
) WITHOUT ROWID;

CREATE TABLE sweep_member_stages (
    run_id    INTEGER NOT NULL REFERENCES runs (id),
    member    INTEGER NOT NULL,
    stage     TEXT    NOT NULL,  -- the stage's name in the pipeline file
    run_stage TEXT    NOT NULL,  -- its copy in the run: `vq1@seed=0`, or `prep` when all share it
    PRIMARY KEY (run_id, member, stage)
) WITHOUT ROWID;

-- Per sweep member and stage (named as in the file): the copy's status and
-- the stage run behind its artifact, as in `run_stages`.
--   SELECT ms.member, m.name, m.last_value FROM member_stages ms
--   JOIN metric_summaries m ON m.stage_run_id = ms.producer WHERE ms.run_id = 1
CREATE VIEW member_stages AS
SELECT m.run_id, m.member, m.stage, m.run_stage, rs.kind, rs.status, rs.key, rs.producer
FROM sweep_member_stages m
JOIN run_stages rs ON rs.run_id = m.run_id AND rs.stage = m.run_stage;
