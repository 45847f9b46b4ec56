"""What people read from runs: the report command (tables and plots from run folders) and the
trackers that send each metrics.jsonl record to TensorBoard or MLflow."""
