"""What a benchmark reports, from raw per-request samples: statistics (percentiles, blocks,
bootstrap intervals), the published tables, CSV and charts, and the simulated bound beside them."""
