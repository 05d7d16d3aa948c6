-- Human evaluation: the packages `human_eval_export` wrote that raters
-- answered, and their answers. `eval serve` (the local rating page) and
-- `eval import` (a crowd platform's results file) write them.

CREATE TABLE rating_packages (
    digest        TEXT    PRIMARY KEY,  -- blake3 of the package's manifest.json
    path          TEXT    NOT NULL,     -- where it was when first rated
    set_a         TEXT    NOT NULL,     -- the compared sets (input names)
    set_b         TEXT    NOT NULL,
    tasks         INTEGER NOT NULL,
    registered_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE ratings (
    id          INTEGER PRIMARY KEY,
    package     TEXT    NOT NULL REFERENCES rating_packages (digest),
    task_id     TEXT    NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('pair', 'catch')),
    rater       TEXT    NOT NULL,
    choice      TEXT    NOT NULL CHECK (choice IN ('left', 'right')),
    chosen      TEXT    NOT NULL,   -- the source of the chosen image ('broken': a failed catch trial)
    origin      TEXT    NOT NULL,   -- 'local' (eval serve) or 'import:FILE'
    answered_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (package, task_id, rater)  -- one answer per rater and task: a re-import adds nothing
);
CREATE INDEX ratings_package ON ratings (package, rater);
