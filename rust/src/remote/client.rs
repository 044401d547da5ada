//! The S3 client of a bucket (settings from the AWS environment variables), the process's Tokio
//! runtime that drives it, and object-store failures as one line naming the URL and what to set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use zarrs_object_store::object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use zarrs_object_store::object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::error::{Error, Result};

/// Seconds to wait for a connection before the endpoint counts as not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a failed request (object_store backs off between them) and their time limit.
const MAX_RETRIES: usize = 4;
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The endpoint the environment names (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`), if any.
pub fn endpoint() -> Option<String> {
    env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"))
}

/// The client of `bucket`: credentials, region and endpoint as the AWS tools read them (plain
/// `http://` endpoints allowed, for local S3 servers), conditional puts (`If-None-Match: *`) on.
/// One per bucket and settings in a process, so that its connections are reused.
pub fn s3_client(bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let mut settings: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect();
    settings.sort();
    let id = format!("{bucket}\n{settings:?}");
    let clients = CLIENTS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(client) = clients.lock().unwrap().get(&id) {
        return Ok(client.clone());
    }
    let client = build_client(bucket, url)?;
    clients.lock().unwrap().insert(id, client.clone());
    Ok(client)
}

fn build_client(bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_retry(RetryConfig {
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
            ..Default::default()
        });
    let mut options = ClientOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
    if let Some(endpoint) = endpoint() {
        options = options.with_allow_http(endpoint.starts_with("http://"));
        builder = builder.with_endpoint(endpoint);
    }
    builder = builder.with_client_options(options);
    if let Some(region) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
        builder = builder.with_region(region);
    }
    let client = builder
        .build()
        .map_err(|e| Error::Invalid(format!("{url}: S3 settings: {e}")))?;
    Ok(Arc::new(client))
}

/// One line for a failed request to `url` (a store, or an object in it): what went wrong and
/// what to set. Missing objects are `NotFound`; everything else `Io`.
pub fn describe(url: &str, err: &zarrs_object_store::object_store::Error) -> Error {
    use zarrs_object_store::object_store::Error as E;
    let text = err.to_string();
    let bucket = url
        .strip_prefix(crate::location::S3_SCHEME)
        .and_then(|r| r.split('/').next())
        .unwrap_or(url);
    let at = endpoint().map_or_else(|| "AWS".to_string(), |e| format!("endpoint {e}"));
    // Without keys in the environment object_store asks the instance metadata service (IMDS).
    let line = if text.contains("/latest/api/token") || text.contains("/latest/meta-data") {
        format!(
            "{url}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (and AWS_ENDPOINT_URL for a server other than AWS)"
        )
    } else if text.contains("NoSuchBucket") {
        format!("{url}: the bucket '{bucket}' does not exist at {at}")
    } else if matches!(err, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || text.contains("AccessDenied")
        || text.contains("403 Forbidden")
        || text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
    {
        format!(
            "{url}: access denied by {at}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and \
             their permissions on the bucket '{bucket}'"
        )
    } else if text.contains("error sending request")
        || text.contains("onnect")
        || text.contains("timed out")
        || text.contains("dns error")
    {
        format!(
            "{url}: {at} does not answer: check AWS_ENDPOINT_URL and the network ({})",
            first_line(&text)
        )
    } else if let E::NotFound { .. } = err {
        return Error::NotFound(format!("{url}: no such object"));
    } else {
        format!("{url}: {}", first_line(&text))
    };
    Error::Io(line)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// Runs `future` to completion on the process's Tokio runtime (not from inside it).
pub fn block_on<F: core::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// The process's Tokio runtime for object-store I/O.
pub fn runtime() -> &'static tokio::runtime::Runtime {
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
