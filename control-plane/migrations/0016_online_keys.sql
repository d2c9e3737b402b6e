-- The repository's online keys (snapshot, timestamp), for replicas that do
-- not share a data dir: sealed with a key-encryption key only the replicas
-- hold (XChaCha20-Poly1305, the role as associated data). Empty when the
-- keys are files in the data dir.
CREATE TABLE repository_online_keys (
    role TEXT PRIMARY KEY NOT NULL,
    -- The first 8 bytes of the key-encryption key's SHA-256, hex.
    kek_id TEXT NOT NULL,
    nonce_hex TEXT NOT NULL,
    sealed_hex TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
