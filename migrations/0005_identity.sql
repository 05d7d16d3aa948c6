-- The workspace's identity: one random id, also written beside the file
-- (`registry-id`), so that a registry emptied or replaced behind the
-- workspace's back is noticed instead of starting a silent new history.
CREATE TABLE workspace_identity (
    id TEXT NOT NULL
);
