"""Metrics that need no run: FID statistics in a reference network's features, a Kneser-Ney judge of text."""
