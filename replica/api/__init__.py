"""The replica's wire contract: request schemas and the error hierarchy mapped to HTTP statuses."""
