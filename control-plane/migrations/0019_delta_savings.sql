-- What deltas did for each till's bundle: the bytes it did not download
-- because it rebuilt target_version from a delta, and why a delta it was
-- offered could not be used (it then fetched the whole bundle).
ALTER TABLE device_bundle_status ADD COLUMN bytes_saved_by_delta BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_bundle_status ADD COLUMN delta_error TEXT NOT NULL DEFAULT '';
