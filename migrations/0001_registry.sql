-- The experiment registry. Only the driver process writes it.
-- Times are ISO-8601 UTC text (strftime), so that plain SQL reads them.

CREATE TABLE runs (
    id              INTEGER PRIMARY KEY,
    pipeline        TEXT    NOT NULL,  -- absolute path of the pipeline file
    pipeline_digest TEXT    NOT NULL,  -- blake3 of its text at the start of the run
    targets         TEXT    NOT NULL DEFAULT '',  -- stage names asked for, space separated; '' = all
    status          TEXT    NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
    driver_pid      INTEGER,
    started_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at     TEXT
);
CREATE INDEX runs_pipeline ON runs (pipeline, id);

CREATE TABLE stage_runs (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs (id),
    stage        TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    key          TEXT,               -- stage key (null while inputs are unknown)
    key_material TEXT,               -- the JSON the key hashes: why a stage is stale
    status       TEXT    NOT NULL CHECK (status IN
                   ('pending', 'running', 'succeeded', 'failed', 'skipped', 'interrupted', 'cached')),
    attempt      INTEGER NOT NULL DEFAULT 1,
    worker       TEXT,               -- e.g. local:PID, slurm:JOBID
    device       TEXT,               -- cpu, cuda:0, ...
    job_id       TEXT,               -- external job id (cluster back-ends)
    started_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at  TEXT,
    error        TEXT,
    log_path     TEXT
);
CREATE INDEX stage_runs_run ON stage_runs (run_id, stage);
CREATE INDEX stage_runs_stage ON stage_runs (stage, id);

-- Params of each executed stage run, flattened (nested keys joined with '.').
CREATE TABLE params (
    stage_run_id INTEGER NOT NULL REFERENCES stage_runs (id),
    name         TEXT    NOT NULL,
    value        TEXT    NOT NULL,
    PRIMARY KEY (stage_run_id, name)
) WITHOUT ROWID;
CREATE INDEX params_name_value ON params (name, value);

CREATE TABLE metrics (
    stage_run_id INTEGER NOT NULL REFERENCES stage_runs (id),
    name         TEXT    NOT NULL,
    step         INTEGER NOT NULL,
    value        REAL    NOT NULL,
    PRIMARY KEY (stage_run_id, name, step)
) WITHOUT ROWID;

-- Kept by the driver as metrics arrive, so that "best runs by X" needs no scan.
CREATE TABLE metric_summaries (
    stage_run_id INTEGER NOT NULL REFERENCES stage_runs (id),
    name         TEXT    NOT NULL,
    last_step    INTEGER NOT NULL,
    last_value   REAL    NOT NULL,
    min_value    REAL    NOT NULL,
    max_value    REAL    NOT NULL,
    points       INTEGER NOT NULL,
    PRIMARY KEY (stage_run_id, name)
) WITHOUT ROWID;
CREATE INDEX metric_summaries_last ON metric_summaries (name, last_value);
CREATE INDEX metric_summaries_min ON metric_summaries (name, min_value);

CREATE TABLE artifacts (
    key          TEXT    PRIMARY KEY,
    stage        TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    path         TEXT    NOT NULL,   -- folder in the workspace's artifact store
    digest       TEXT    NOT NULL,   -- blake3 over the manifest's file list
    bytes        INTEGER NOT NULL,
    stage_run_id INTEGER REFERENCES stage_runs (id),
    created_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Which artifacts a stage run read (its inputs), by input name.
CREATE TABLE lineage (
    stage_run_id INTEGER NOT NULL REFERENCES stage_runs (id),
    input        TEXT    NOT NULL,
    artifact_key TEXT    NOT NULL,
    PRIMARY KEY (stage_run_id, input)
) WITHOUT ROWID;
CREATE INDEX lineage_artifact ON lineage (artifact_key);

-- Stat cache for dep hashing: a file whose size, mtime and inode are unchanged
-- is not read again. Only an optimisation; contents decide the key.
CREATE TABLE file_hashes (
    path     TEXT    PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    digest   TEXT    NOT NULL
) WITHOUT ROWID;
