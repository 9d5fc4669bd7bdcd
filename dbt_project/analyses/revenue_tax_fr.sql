-- The brief: monthly tax amount for the retail sector in France.
-- Run with `stripe-platform query revenue-tax-fr`.
SELECT d.Year, d.Month, SUM(r.TaxAmount) AS MonthlyTaxAmount
FROM FACT_Revenue AS r
JOIN DIM_Date AS d ON r.DateKey = d.DateKey
JOIN DIM_Merchant AS m ON r.MerchantKey = m.MerchantKey
JOIN DIM_Location AS l ON r.LocationKey = l.LocationKey
WHERE m.Industry = 'Retail' AND l.Country = 'France'
GROUP BY d.Year, d.Month
ORDER BY d.Year, d.Month;
