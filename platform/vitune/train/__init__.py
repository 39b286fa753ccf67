"""Training: records → tokenized rows joined to features (data), the per-worker loop (worker), the driver."""
