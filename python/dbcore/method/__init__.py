"""The method's formulas as pure torch/numpy: EDM constants and preconditioning, the partition of
noise levels into blocks, loss weights, counter-based draws, the sampler, a batch's noise, and the types
the recipe interface trades in. Nothing here opens a file."""
