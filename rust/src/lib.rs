//! Rust core of dbcore: Zarr v3 stores of cached activations and targets.
//!
//! `store`, `writer`, `gather`, `layout`, `dtype`, `decode` (images) are plain Rust (tested with `cargo test`);
//! `python` is the thin pyo3 layer exposed as `dbcore._native`.

pub mod decode;
pub mod dtype;
pub mod error;
pub mod gather;
pub mod layout;
pub mod location;
pub mod philox;
pub mod remote;
pub mod store;
pub mod stream;
pub mod writer;

mod python;
