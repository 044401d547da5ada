"""Data: sources (images, text), the Zarr v3 store (Rust), the batch stream (Rust), the cache writer."""
