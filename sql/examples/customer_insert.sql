-- The brief's pgcrypto example: password hashed with crypt()/gen_salt('bf'), personal fields
-- encrypted (pii_encrypt: pgp_sym_encrypt with AES-256 under the Customer table's data key,
-- postgres/customer, which the one-argument form uses; other tables name theirs:
-- pii_encrypt(line1, 'postgres/address')). The ciphertext names its key and version.
INSERT INTO Customer (ID, UserName, Password, Email, FullName, CountryCode, PreferredDevice,
                      PreferredPaymentMethodID, PreferredCurrencyID)
VALUES (12, 'John42', crypt('password_john', gen_salt('bf')), pii_encrypt('john.doe@stripe.com'),
        pii_encrypt('John Doe'), 'FR', 'Tablet', 3, 1)
ON CONFLICT (UserName) DO NOTHING;
