-- The classification of every column of every public table (issue 20 §1), read by the catalog
-- (stripe_platform.governance.classification) and by RBAC below.
--
-- Grammar of a column comment: '<LABEL>: <what it holds>[ [category]][ [subject]]'
--   LABEL     PCI     card data (PAN): PCI-DSS scope                     -> pci
--             PII     direct identifier (name, e-mail, phone, street)    -> pii
--             QUASI   quasi-identifier or pseudonym (IP, postal code,
--                     keyed hash, login handle, device fingerprint)      -> pii_quasi
--             SECRET  credential: password hash, token, key              -> credential
--             NONE    non-personal                                       -> non_personal
--   [a.b.c]   optional fideslang-style data category, e.g. [user.contact.email]
--   [subject] the column naming the data subject (the customer id) of the table's rows
-- Every column needs one: `stripe-platform catalog check` (the CI gate) fails on a column without.
-- A later COMMENT replaces an earlier one, so this migration restates the labels of 0003/0004 with
-- their categories, and relabels: Customer.EmailHash (a keyed hash of the e-mail is a pseudonym),
-- Address.PostalCode and Transaction.IPAddress (quasi-identifiers) become QUASI; they stay hidden.

COMMENT ON COLUMN Currency.ID IS 'NONE: currency id';
COMMENT ON COLUMN Currency.Code IS 'NONE: ISO 4217 code';
COMMENT ON COLUMN Currency.Name IS 'NONE: currency name';
COMMENT ON COLUMN Currency.Symbol IS 'NONE: display symbol';
COMMENT ON COLUMN Currency.MinorUnits IS 'NONE: decimal places';

COMMENT ON COLUMN PaymentMethod.ID IS 'NONE: payment method id';
COMMENT ON COLUMN PaymentMethod.Name IS 'NONE: payment method name';
COMMENT ON COLUMN PaymentMethod.IsCard IS 'NONE: card-based method';

COMMENT ON COLUMN TransactionStatus.ID IS 'NONE: status id';
COMMENT ON COLUMN TransactionStatus.Name IS 'NONE: status name';
COMMENT ON COLUMN TransactionStatus.IsTerminal IS 'NONE: no change after it';
COMMENT ON COLUMN TransactionStatus.Description IS 'NONE: what the status means';

COMMENT ON COLUMN TransactionStatusTransition.FromStatusID IS 'NONE: allowed transition, from';
COMMENT ON COLUMN TransactionStatusTransition.ToStatusID IS 'NONE: allowed transition, to';

COMMENT ON COLUMN Industry.ID IS 'NONE: industry id';
COMMENT ON COLUMN Industry.Name IS 'NONE: industry name';

COMMENT ON COLUMN MerchantSize.ID IS 'NONE: size band id';
COMMENT ON COLUMN MerchantSize.Name IS 'NONE: size band name';
COMMENT ON COLUMN MerchantSize.Description IS 'NONE: size band definition';

COMMENT ON COLUMN Location.ID IS 'NONE: city id';
COMMENT ON COLUMN Location.City IS 'NONE: city name (reference data)';
COMMENT ON COLUMN Location.Region IS 'NONE: region name';
COMMENT ON COLUMN Location.Country IS 'NONE: country name';
COMMENT ON COLUMN Location.CountryCode IS 'NONE: ISO country code';
COMMENT ON COLUMN Location.Latitude IS 'NONE: city centre latitude';
COMMENT ON COLUMN Location.Longitude IS 'NONE: city centre longitude';

COMMENT ON COLUMN Customer.ID IS 'NONE: customer id [user.unique_id] [subject]';
COMMENT ON COLUMN Customer.UserName IS 'QUASI: login handle chosen by the customer, unique [user.account.username]';
COMMENT ON COLUMN Customer.Password IS 'SECRET: bcrypt hash, crypt(password, gen_salt(''bf'')) [user.authorization.credentials]';
COMMENT ON COLUMN Customer.Email IS 'PII: email address, encrypted [user.contact.email]';
COMMENT ON COLUMN Customer.EmailHash IS 'QUASI: keyed hash of the email (pseudonym), for lookups by email [user.contact.email]';
COMMENT ON COLUMN Customer.FullName IS 'PII: full name, encrypted [user.name]';
COMMENT ON COLUMN Customer.Phone IS 'PII: phone number, encrypted [user.contact.phone_number]';
COMMENT ON COLUMN Customer.CountryCode IS 'NONE: ISO country of residence (8 countries: no smaller than a country) [user.contact.address.country]';
COMMENT ON COLUMN Customer.PreferredDevice IS 'NONE: device type preference';
COMMENT ON COLUMN Customer.PreferredPaymentMethodID IS 'NONE: payment method preference';
COMMENT ON COLUMN Customer.PreferredCurrencyID IS 'NONE: currency preference';
COMMENT ON COLUMN Customer.CreatedAt IS 'NONE: row created [system.operations]';
COMMENT ON COLUMN Customer.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN Address.ID IS 'NONE: address id';
COMMENT ON COLUMN Address.CustomerID IS 'NONE: the customer [user.unique_id] [subject]';
COMMENT ON COLUMN Address.Line1 IS 'PII: street address, encrypted [user.contact.address.street]';
COMMENT ON COLUMN Address.PostalCode IS 'QUASI: postal code [user.contact.address.postal_code]';
COMMENT ON COLUMN Address.LocationID IS 'NONE: city of the address (reference data)';
COMMENT ON COLUMN Address.IsBilling IS 'NONE: billing address flag';
COMMENT ON COLUMN Address.CreatedAt IS 'NONE: row created [system.operations]';
COMMENT ON COLUMN Address.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN Device.ID IS 'NONE: device id';
COMMENT ON COLUMN Device.CustomerID IS 'NONE: the customer [user.unique_id] [subject]';
COMMENT ON COLUMN Device.DeviceType IS 'NONE: Mobile, Tablet or Desktop';
COMMENT ON COLUMN Device.OS IS 'NONE: operating system';
COMMENT ON COLUMN Device.OSVersion IS 'NONE: operating system version';
COMMENT ON COLUMN Device.Browser IS 'NONE: browser';
COMMENT ON COLUMN Device.BrowserVersion IS 'NONE: browser version';
COMMENT ON COLUMN Device.Fingerprint IS 'QUASI: stable device fingerprint: tracks one device across sessions [user.device.device_id]';
COMMENT ON COLUMN Device.FirstSeenAt IS 'NONE: first seen [system.operations]';
COMMENT ON COLUMN Device.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN Merchant.ID IS 'NONE: merchant id';
COMMENT ON COLUMN Merchant.Name IS 'NONE: business name';
COMMENT ON COLUMN Merchant.IndustryID IS 'NONE: industry';
COMMENT ON COLUMN Merchant.MerchantSizeID IS 'NONE: size band';
COMMENT ON COLUMN Merchant.Rating IS 'NONE: average rating';
COMMENT ON COLUMN Merchant.MerchantCategoryCode IS 'NONE: ISO 18245 MCC';
COMMENT ON COLUMN Merchant.LocationID IS 'NONE: head office city';
COMMENT ON COLUMN Merchant.CreatedAt IS 'NONE: row created [system.operations]';
COMMENT ON COLUMN Merchant.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN PaymentInstrument.ID IS 'NONE: instrument id';
COMMENT ON COLUMN PaymentInstrument.CustomerID IS 'NONE: the card holder [user.unique_id] [subject]';
COMMENT ON COLUMN PaymentInstrument.PaymentMethodID IS 'NONE: payment method';
COMMENT ON COLUMN PaymentInstrument.Brand IS 'NONE: card scheme';
COMMENT ON COLUMN PaymentInstrument.Last4 IS 'QUASI: last four PAN digits (truncated PAN, displayable under PCI DSS) [user.financial.credit_card]';
COMMENT ON COLUMN PaymentInstrument.PAN IS 'PCI: primary account number, encrypted [user.financial.credit_card]';
COMMENT ON COLUMN PaymentInstrument.ExpiryMonth IS 'QUASI: card expiry month [user.financial.credit_card]';
COMMENT ON COLUMN PaymentInstrument.ExpiryYear IS 'QUASI: card expiry year [user.financial.credit_card]';
COMMENT ON COLUMN PaymentInstrument.CreatedAt IS 'NONE: row created [system.operations]';
COMMENT ON COLUMN PaymentInstrument.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN Transaction.ID IS 'NONE: payment id';
COMMENT ON COLUMN Transaction.TransactionStatusID IS 'NONE: status';
COMMENT ON COLUMN Transaction.MerchantID IS 'NONE: merchant';
COMMENT ON COLUMN Transaction.Amount IS 'NONE: amount in its currency';
COMMENT ON COLUMN Transaction.CurrencyID IS 'NONE: currency';
COMMENT ON COLUMN Transaction.PaymentMethodID IS 'NONE: payment method';
COMMENT ON COLUMN Transaction.PaymentInstrumentID IS 'NONE: card or account used';
COMMENT ON COLUMN Transaction.DeviceID IS 'NONE: device used';
COMMENT ON COLUMN Transaction.CustomerID IS 'NONE: the payer [user.unique_id] [subject]';
COMMENT ON COLUMN Transaction.BillingAddressID IS 'NONE: billing address used';
COMMENT ON COLUMN Transaction.TransactionLocationID IS 'NONE: city of the payment (reference data)';
COMMENT ON COLUMN Transaction.IPAddress IS 'QUASI: client IP address [user.device.ip_address]';
COMMENT ON COLUMN Transaction.DateTime IS 'NONE: when the payment happened, the partition key';
COMMENT ON COLUMN Transaction.CreatedAt IS 'NONE: row created [system.operations]';
COMMENT ON COLUMN Transaction.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN TransactionStateChanges.ID IS 'NONE: audit row id';
COMMENT ON COLUMN TransactionStateChanges.TransactionID IS 'NONE: payment';
COMMENT ON COLUMN TransactionStateChanges.TransactionDateTime IS 'NONE: payment time (partition key)';
COMMENT ON COLUMN TransactionStateChanges.FromStatusID IS 'NONE: status before';
COMMENT ON COLUMN TransactionStateChanges.ToStatusID IS 'NONE: status after';
COMMENT ON COLUMN TransactionStateChanges.Reason IS 'NONE: why the status changed [system.operations]';
COMMENT ON COLUMN TransactionStateChanges.UpdatedBy IS 'NONE: the service that made the change (payments-api, card network, ...) [system.operations]';
COMMENT ON COLUMN TransactionStateChanges.UpdatedAt IS 'NONE: when [system.operations]';

COMMENT ON COLUMN FraudScore.TransactionID IS 'NONE: payment';
COMMENT ON COLUMN FraudScore.TransactionDateTime IS 'NONE: payment time';
COMMENT ON COLUMN FraudScore.ModelName IS 'NONE: model [system.operations]';
COMMENT ON COLUMN FraudScore.ModelVersion IS 'NONE: model version [system.operations]';
COMMENT ON COLUMN FraudScore.FeatureVersion IS 'NONE: feature set version [system.operations]';
COMMENT ON COLUMN FraudScore.Score IS 'NONE: fraud score';
COMMENT ON COLUMN FraudScore.Threshold IS 'NONE: decision threshold';
COMMENT ON COLUMN FraudScore.IsFraud IS 'NONE: Score >= Threshold';
COMMENT ON COLUMN FraudScore.ScoredAt IS 'NONE: when scored [system.operations]';
COMMENT ON COLUMN FraudScore.DocumentWrittenAt IS 'NONE: document outbox mark [system.operations]';
COMMENT ON COLUMN FraudScore.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

COMMENT ON COLUMN FraudScoreEvent.TransactionID IS 'NONE: payment';
COMMENT ON COLUMN FraudScoreEvent.LSN IS 'NONE: WAL position of the change [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.TransactionDateTime IS 'NONE: payment time';
COMMENT ON COLUMN FraudScoreEvent.CommitTime IS 'NONE: source commit time [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.ScoredAt IS 'NONE: when scored [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.ModelName IS 'NONE: model [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.ModelVersion IS 'NONE: model version [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.FeatureVersion IS 'NONE: feature set version [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.Score IS 'NONE: fraud score';
COMMENT ON COLUMN FraudScoreEvent.Threshold IS 'NONE: decision threshold';
COMMENT ON COLUMN FraudScoreEvent.IsFraud IS 'NONE: Score >= Threshold';
COMMENT ON COLUMN FraudScoreEvent.Source IS 'NONE: embedded or debezium [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.CommitToScoreMs IS 'NONE: latency [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.DocumentWrittenAt IS 'NONE: document outbox mark [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.AlertedAt IS 'NONE: alert outbox mark [system.operations]';
COMMENT ON COLUMN FraudScoreEvent.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';

-- RBAC: the same narrowing as 0005 with QUASI added: every class but NONE (classification
-- RESTRICTED: pci, pii, pii_quasi, credential) is hidden from Developer and ReadOnlyUser, so every
-- column hidden before stays hidden, and the quasi-identifiers join them.
CREATE OR REPLACE FUNCTION apply_column_privileges() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    visible text;
    narrowed integer := 0;
BEGIN
    FOR t IN
        SELECT c.oid, n.nspname, c.relname, coalesce(pg_partition_root(c.oid), c.oid) AS root
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
    LOOP
        IF NOT EXISTS (
            SELECT FROM pg_attribute a
            WHERE a.attrelid = t.root AND a.attnum > 0 AND NOT a.attisdropped
              AND col_description(t.root, a.attnum) ~ '^(PII|PCI|SECRET|QUASI):'
        ) THEN
            CONTINUE;
        END IF;
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO visible
        FROM pg_attribute a
        WHERE a.attrelid = t.root AND a.attnum > 0 AND NOT a.attisdropped
          AND coalesce(col_description(t.root, a.attnum), '') !~ '^(PII|PCI|SECRET|QUASI):';
        EXECUTE format('REVOKE SELECT, INSERT, UPDATE ON %I.%I FROM Developer, ReadOnlyUser',
                       t.nspname, t.relname);
        EXECUTE format('GRANT SELECT (%s) ON %I.%I TO Developer, ReadOnlyUser',
                       visible, t.nspname, t.relname);
        EXECUTE format('GRANT INSERT (%s), UPDATE (%s) ON %I.%I TO Developer',
                       visible, visible, t.nspname, t.relname);
        narrowed := narrowed + 1;
    END LOOP;
    RETURN narrowed;
END
$$;

SELECT apply_column_privileges();
