-- A webhook's own CA, trusted beside the system's roots for its https://
-- receiver (a company CA, say): PEM, one or more certificates; empty for
-- none. Not a secret, but only its subjects and fingerprints are listed.
ALTER TABLE webhooks ADD COLUMN ca_pem TEXT NOT NULL DEFAULT '';
