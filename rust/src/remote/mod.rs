//! Stores in object storage: the S3 client and its errors (`client`), the persistent local cache of
//! objects (`disk`), a finalized store read through it (`cached`), and the one-writer lock
//! (`lock`).

pub mod cached;
pub mod client;
pub mod disk;
pub mod lock;

pub use cached::CachedStorage;
pub use disk::{DiskCache, Settings};
