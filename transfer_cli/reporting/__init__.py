"""What a run writes for people and for the report command: results.json, metrics.jsonl."""
