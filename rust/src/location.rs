//! Where a store lives: a local folder, or a prefix in an S3-compatible bucket (`s3://bucket/prefix`),
//! and the zarrs storage that reads and writes it.
//!
//! Object stores go through `object_store` (credentials, region and endpoint from the standard AWS
//! environment variables, `AWS_ENDPOINT_URL` included; plain `http://` endpoints are allowed, for
//! local S3 servers), wrapped for zarrs' synchronous API by one process-wide Tokio runtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::storage_adapter::async_to_sync::{
    AsyncToSyncBlockOn, AsyncToSyncStorageAdapter,
};
use zarrs::storage::ReadableWritableListableStorage;
use zarrs_object_store::object_store::aws::AmazonS3Builder;
use zarrs_object_store::object_store::prefix::PrefixStore;
use zarrs_object_store::AsyncObjectStore;

use crate::error::{Error, Result};

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
            Location::S3 { bucket, prefix } => {
                let s3 = s3_builder(bucket)
                    .build()
                    .map_err(|e| Error::Io(format!("{self}: {e}")))?;
                let store = AsyncObjectStore::new(PrefixStore::new(s3, prefix.as_str()));
                Ok(Arc::new(AsyncToSyncStorageAdapter::new(
                    Arc::new(store),
                    TokioBlockOn,
                )))
            }
        }
    }
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

/// S3 settings from the environment, as the AWS tools read them.
fn s3_builder(bucket: &str) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    if let Some(endpoint) = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")) {
        builder = builder
            .with_allow_http(endpoint.starts_with("http://"))
            .with_endpoint(endpoint);
    }
    if let Some(region) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
        builder = builder.with_region(region);
    }
    builder
}

/// Runs object-store futures to completion on the process's Tokio runtime.
#[derive(Clone, Copy)]
struct TokioBlockOn;

impl AsyncToSyncBlockOn for TokioBlockOn {
    fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
        runtime().block_on(future)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dbcore-io")
            .enable_all()
            .build()
            .expect("a Tokio runtime for object-store I/O")
    })
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
