"""Models: the model interface and its backends, the registry (routing, versions, hot swap),
checks and fingerprints, the inference worker threads and the MLflow resolver."""
