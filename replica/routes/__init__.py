"""HTTP routes, one module per protocol: health/ops, OpenAI, KServe v2, SageMaker."""
