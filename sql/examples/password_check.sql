-- The brief's password check: true when the password matches the stored bcrypt hash.
SELECT UserName, (Password = crypt('password_john', Password)) AS IsGoodPassword
FROM Customer
WHERE UserName = 'John42';
