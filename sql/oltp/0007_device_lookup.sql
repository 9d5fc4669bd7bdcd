-- Which transactions used a device: fraud features (devices shared across customers) and the
-- foreign-key check when a customer removes a device both need it.
CREATE INDEX transaction_device ON Transaction (DeviceID);
