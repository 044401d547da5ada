//! Where a store lives: a local folder, or a prefix in an S3-compatible bucket (`s3://bucket/prefix`),
//! and the zarrs storage that reads and writes it.
//!
//! Object stores go through `object_store` (`remote::client`: settings from the standard AWS
//! environment variables), wrapped for zarrs' synchronous API by one process-wide Tokio runtime;
//! a finalized store is read through the local disk cache (`remote::cached`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::storage_adapter::async_to_sync::{
    AsyncToSyncBlockOn, AsyncToSyncStorageAdapter,
};
use zarrs::storage::ReadableWritableListableStorage;
use zarrs_object_store::object_store::prefix::PrefixStore;
use zarrs_object_store::object_store::ObjectStore;
use zarrs_object_store::AsyncObjectStore;

use crate::error::{Error, Result};
use crate::remote::{client, disk, CachedStorage, DiskCache};

pub const S3_SCHEME: &str = "s3://";

/// A store's place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// `s3://bucket/prefix` or a local path.
    pub fn parse(text: &str) -> Result<Location> {
        let Some(rest) = text.strip_prefix(S3_SCHEME) else {
            return Ok(Location::Local(PathBuf::from(text)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() || prefix.is_empty() {
            return Err(Error::Invalid(format!(
                "{text}: an s3:// store needs a bucket and a prefix (s3://bucket/name.zarr)"
            )));
        }
        Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The folder of a local store.
    pub fn local(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::S3 { .. } => None,
        }
    }

    /// The storage of the group; a local folder must exist.
    pub fn storage(&self) -> Result<ReadableWritableListableStorage> {
        match self {
            Location::Local(path) => Ok(Arc::new(
                FilesystemStore::new(path).map_err(|e| Error::Io(format!("{self}: {e}")))?,
            )),
            Location::S3 { .. } => Ok(self.s3_storage()?.1),
        }
    }

    /// The client of an `s3://` store (scoped to its prefix) and its zarrs storage.
    fn s3_storage(&self) -> Result<(Arc<dyn ObjectStore>, ReadableWritableListableStorage)> {
        let Location::S3 { bucket, prefix } = self else {
            unreachable!("an s3:// location")
        };
        let client = client::s3_client(bucket, &self.to_string())?;
        let scoped: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(client, prefix.as_str()));
        let store = AsyncObjectStore::new(scoped.clone());
        let storage = Arc::new(AsyncToSyncStorageAdapter::new(
            Arc::new(store),
            TokioBlockOn,
        ));
        Ok((scoped, storage))
    }

    /// The storage to read a finalized store: for an `s3://` store, through the local disk cache
    /// (None when the cache is off: then read range by range).
    pub fn read_storage(&self) -> Result<(ReadableWritableListableStorage, Option<CachedStorage>)> {
        let Location::S3 { .. } = self else {
            return Ok((self.storage()?, None));
        };
        let (scoped, direct) = self.s3_storage()?;
        let Some(disk) = disk_cache()? else {
            return Ok((direct, None));
        };
        let cached = CachedStorage::open(&self.to_string(), scoped, direct, disk)?;
        Ok((Arc::new(cached.clone()), Some(cached)))
    }
}

/// The process's disk cache for the settings in force (None when its limit is 0).
fn disk_cache() -> Result<Option<Arc<DiskCache>>> {
    static CACHE: OnceLock<Mutex<Option<Arc<DiskCache>>>> = OnceLock::new();
    let settings = disk::settings()?;
    if settings.limit == 0 {
        return Ok(None);
    }
    let mut held = CACHE.get_or_init(|| Mutex::new(None)).lock().unwrap();
    if held.as_ref().is_none_or(|c| c.settings != settings) {
        *held = Some(Arc::new(DiskCache::new(settings)));
    }
    Ok(held.clone())
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Location::Local(path.to_path_buf())
    }
}

impl From<&PathBuf> for Location {
    fn from(path: &PathBuf) -> Self {
        Location::Local(path.clone())
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location::Local(path)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::S3 { bucket, prefix } => write!(f, "{S3_SCHEME}{bucket}/{prefix}"),
        }
    }
}

/// Runs object-store futures to completion on the process's Tokio runtime.
#[derive(Clone, Copy)]
struct TokioBlockOn;

impl AsyncToSyncBlockOn for TokioBlockOn {
    fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
        client::block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_paths_and_s3_urls() {
        assert_eq!(
            Location::parse("a/b.zarr").unwrap(),
            Location::Local("a/b.zarr".into())
        );
        let s3 = Location::parse("s3://bkt/runs/c.zarr/").unwrap();
        assert_eq!(
            s3,
            Location::S3 {
                bucket: "bkt".into(),
                prefix: "runs/c.zarr".into()
            }
        );
        assert_eq!(s3.to_string(), "s3://bkt/runs/c.zarr");
        assert!(s3.local().is_none());
        for bad in ["s3://", "s3://bkt", "s3://bkt/", "s3:///x"] {
            assert!(
                matches!(Location::parse(bad), Err(Error::Invalid(_))),
                "{bad}"
            );
        }
    }
}
