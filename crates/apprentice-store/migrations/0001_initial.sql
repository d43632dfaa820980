-- Ids are lowercase hyphenated UUIDv7 text, so ordering by id orders by creation time.
-- Timestamps are RFC3339 UTC text with a fixed nanosecond width, so they also sort as text.
-- JSON columns hold serde_json text of the apprentice-core types.

CREATE TABLE episodes (
    id            TEXT PRIMARY KEY NOT NULL,
    function_name TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

CREATE TABLE inferences (
    id            TEXT PRIMARY KEY NOT NULL,
    function_name TEXT NOT NULL,
    variant_name  TEXT NOT NULL,
    episode_id    TEXT NOT NULL REFERENCES episodes(id),
    input         TEXT NOT NULL,
    rendered      TEXT NOT NULL,
    output        TEXT NOT NULL,
    model_name    TEXT NOT NULL,
    provider_name TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    latency_ms    REAL NOT NULL,
    ttft_ms       REAL,
    cost          REAL,
    tags          TEXT NOT NULL,
    params        TEXT NOT NULL,
    finish_reason TEXT,
    created_at    TEXT NOT NULL
);

CREATE INDEX inferences_function_id ON inferences (function_name, id);
CREATE INDEX inferences_episode ON inferences (episode_id);
CREATE INDEX inferences_variant ON inferences (variant_name);

-- `value` is the JSON of the value alone (`true`, `0.75`, `"text"`, an output object), so the kind
-- lives in its own column. `value_num` repeats boolean (1/0) and float values as a number, so
-- curation can filter and rank in SQL without parsing JSON; it is NULL for the other kinds.
CREATE TABLE feedback (
    id           TEXT PRIMARY KEY NOT NULL,
    metric_name  TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('boolean', 'float', 'demonstration', 'comment')),
    target_level TEXT NOT NULL CHECK (target_level IN ('inference', 'episode')),
    target_id    TEXT NOT NULL,
    value        TEXT NOT NULL,
    value_num    REAL,
    tags         TEXT NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE INDEX feedback_target_metric ON feedback (target_id, metric_name);
CREATE INDEX feedback_metric ON feedback (metric_name);
