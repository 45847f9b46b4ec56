"""Per-example routing between frozen and fine-tuned copies of the body's blocks: SpotTune, AdaFilter."""
