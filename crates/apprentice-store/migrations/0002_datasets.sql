-- Curated datasets: a name and version name one content for good. `query` is the dataset spec as
-- JSON and `files` the per-file counts and hashes, so a rerun can be compared with what was made.
CREATE TABLE datasets (
    name                TEXT NOT NULL,
    version             INTEGER NOT NULL,
    function_name       TEXT NOT NULL,
    query               TEXT NOT NULL,
    content_hash        TEXT NOT NULL,
    train_examples      INTEGER NOT NULL,
    validation_examples INTEGER NOT NULL,
    files               TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
