-- The bundle repository: every signed metadata file ever served (history is
-- kept; the newest version of a role is current), and the bundles published.

CREATE TABLE repo_metadata (
    role TEXT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (role, version)
);

CREATE TABLE bundles (
    target TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    hardware_json TEXT NOT NULL,
    length BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    chunks_sha256 TEXT NOT NULL,
    targets_version BIGINT NOT NULL,
    published_at_ms BIGINT NOT NULL
);
CREATE INDEX bundles_name ON bundles (name, published_at_ms);
