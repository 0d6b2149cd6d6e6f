"""Training: data as uint8 batches, the loop with checkpoints and resume, metrics and plots, DDP."""
