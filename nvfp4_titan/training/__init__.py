"""Recipe config, optimizer and schedule, metrics, checkpoints and the training loop."""
