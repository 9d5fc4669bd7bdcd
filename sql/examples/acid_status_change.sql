-- The brief's ACID example, as written (string literals in single quotes).
BEGIN;
-- Step 1 : Update the status of a transaction
UPDATE Transaction
SET TransactionStatusID = 2, UpdatedAt = CURRENT_TIMESTAMP
WHERE ID = 012345;
-- Step 2 : Insert the status update in the audit log table
INSERT INTO TransactionStateChanges (TransactionID, FromStatusID, ToStatusID, Reason, UpdatedBy, UpdatedAt)
VALUES (012345, 1, 2, 'Exceptional refund', 'Customer service', CURRENT_TIMESTAMP);
-- Commit the transaction if both steps succeed
COMMIT;
