"""Runs: the run directory and its checkpoints (locally or mirrored from s3://), the training loop
and step, training, evaluation, sampling reports, Ray, and memory measurement."""
