-- The brief: daily number of credit-card frauds at small merchants.
-- Run with `stripe-platform query fraud-daily-small-credit`.
SELECT d.FullDate, SUM(f.FraudCount) AS DailyFraudCount
FROM FACT_FraudAnalysis AS f
JOIN DIM_Date AS d ON f.DateKey = d.DateKey
JOIN DIM_PaymentMethod AS p ON f.PaymentMethodKey = p.PaymentMethodKey
JOIN DIM_Merchant AS m ON f.MerchantKey = m.MerchantKey
WHERE p.Name = 'Credit Card' AND m.Size = 'Small'
GROUP BY d.FullDate
ORDER BY d.FullDate;
