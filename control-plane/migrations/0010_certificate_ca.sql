-- Which fleet CA issued each till's certificate (SHA-256 of the CA
-- certificate, hex): during a CA rotation, the tills still to renew from
-- the new CA, and whether the old one may be retired. Empty for
-- certificates issued before this was recorded.
ALTER TABLE devices ADD COLUMN certificate_ca TEXT NOT NULL DEFAULT '';
