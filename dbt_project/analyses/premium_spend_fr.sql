-- The brief: yearly total spent by premium customers in France.
-- Run with `stripe-platform query premium-spend-fr`.
SELECT d.Year, SUM(cs.TotalSpent) AS YearlyTotalSpent
FROM FACT_CustomerSegmentation AS cs
JOIN DIM_Date AS d ON cs.DateKey = d.DateKey
JOIN DIM_Customer AS c ON cs.CustomerKey = c.CustomerKey
JOIN DIM_Location AS l ON cs.LocationKey = l.LocationKey
WHERE c.CustomerSegment = 'Premium' AND l.Country = 'France'
GROUP BY d.Year
ORDER BY d.Year;
