-- The certificate last issued to each till (over TLS): what `device show`
-- reports, and how long an expired one may still be renewed.
ALTER TABLE devices ADD COLUMN certificate_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN certificate_not_after_ms BIGINT;
