-- P2P inside a store: where each till listens for the others, device
-- revocation (a revoked till is dropped from its store's membership list and
-- refused by the control plane), and where each till's bundle bytes came
-- from.
ALTER TABLE devices ADD COLUMN p2p_addrs_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN revoked_at_ms BIGINT;
ALTER TABLE devices ADD COLUMN revoked_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE device_bundle_status ADD COLUMN bytes_from_origin BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_bundle_status ADD COLUMN bytes_from_peers BIGINT NOT NULL DEFAULT 0;
