//! One writer at a time for an object-store prefix: the lock is an object beside it
//! (`s3://b/runs/.name.lock`, as a local store's lock file sits beside it) created by a
//! conditional PUT (`If-None-Match: *`), so of two writers exactly one creates it. It names its
//! holder and a lease, which a thread renews while the lock is held; a lock whose lease ran out
//! (its writer was killed), or whose holder was a process of this machine that is gone (a restart
//! after a crash), is taken over, and `force` breaks a live one.

use std::path::Path;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use zarrs_object_store::object_store::path::Path as ObjectPath;
use zarrs_object_store::object_store::{
    Error as ObjectError, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use super::client::{block_on, describe, s3_client};
use crate::error::{Error, Result};
use crate::location::Location;

/// A held lock; released on `release` or drop.
pub struct RemoteLock {
    client: Arc<dyn ObjectStore>,
    path: ObjectPath,
    url: String,
    holder: String,
    renewer: Option<(Sender<()>, JoinHandle<()>)>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn body(holder: &str, what: &str, lease: Duration) -> PutPayload {
    let t = now();
    let v = json!({"holder": holder, "what": what, "since": t, "expires": t + lease.as_secs_f64()});
    PutPayload::from(v.to_string().into_bytes())
}

impl RemoteLock {
    /// Take the lock of `location` (an `s3://` store or run) for `what`, or say who holds it.
    pub fn acquire(
        location: &Location,
        what: &str,
        lease: Duration,
        force: bool,
    ) -> Result<RemoteLock> {
        let Location::S3 { bucket, prefix } = location else {
            return Err(Error::Invalid(format!("{location}: not an s3:// location")));
        };
        let (parent, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let key = if parent.is_empty() {
            format!(".{name}.lock")
        } else {
            format!("{parent}/.{name}.lock")
        };
        let url = format!("{}{bucket}/{key}", crate::location::S3_SCHEME);
        let client = s3_client(bucket, &url)?;
        let path = ObjectPath::from(key.as_str());
        let holder = format!(
            "{}:{}:{:x}",
            host(),
            std::process::id(),
            (now() * 1e6) as u64
        );
        let create = || {
            let opts = PutOptions::from(PutMode::Create);
            block_on(client.put_opts(&path, body(&holder, what, lease), opts))
        };
        let taken = match create() {
            Ok(_) => true,
            Err(ObjectError::AlreadyExists { .. } | ObjectError::Precondition { .. }) => false,
            Err(e) => return Err(describe(&url, &e)),
        };
        if !taken {
            let held = read(&client, &path, &url)?;
            let expired = held
                .as_ref()
                .and_then(|v| v["expires"].as_f64())
                .is_none_or(|t| t < now());
            let gone = held
                .as_ref()
                .and_then(|v| v["holder"].as_str())
                .is_some_and(dead_here);
            if !(expired || gone || force) {
                let v = held.unwrap_or(Value::Null);
                let left = v["expires"].as_f64().map_or(0.0, |t| t - now());
                return Err(Error::Exists(format!(
                    "{location}: another process ({}) is writing this {what} (lock {url}, lease \
                     {left:.0} s left); wait for it",
                    v["holder"].as_str().unwrap_or("?")
                )));
            }
            // A dead writer's lock (or one broken on request): delete it and race for it again.
            block_on(client.delete(&path)).or_else(|e| match e {
                ObjectError::NotFound { .. } => Ok(()),
                e => Err(describe(&url, &e)),
            })?;
            match create() {
                Ok(_) => {}
                Err(ObjectError::AlreadyExists { .. } | ObjectError::Precondition { .. }) => {
                    return Err(Error::Exists(format!(
                        "{location}: another process took the lock {url} first"
                    )))
                }
                Err(e) => return Err(describe(&url, &e)),
            }
        }
        let (stop, stopped) = channel::<()>();
        let renewer = {
            let (client, path, holder, what) = (
                client.clone(),
                path.clone(),
                holder.clone(),
                what.to_string(),
            );
            std::thread::Builder::new()
                .name("dbcore-lock".into())
                .spawn(move || loop {
                    match stopped.recv_timeout(lease / 3) {
                        Err(RecvTimeoutError::Timeout) => {
                            // Renewed only while still ours: a lock broken by another writer
                            // (`force`) is left to it.
                            let held = read(&client, &path, "");
                            if !held
                                .is_ok_and(|v| v.is_some_and(|v| v["holder"] == holder.as_str()))
                            {
                                return;
                            }
                            let _ = block_on(client.put(&path, body(&holder, &what, lease)));
                        }
                        _ => return,
                    }
                })
                .map_err(|e| Error::Io(format!("{url}: cannot start the lease thread: {e}")))?
        };
        Ok(RemoteLock {
            client,
            path,
            url,
            holder,
            renewer: Some((stop, renewer)),
        })
    }

    /// The lock object's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stop renewing and delete the lock if it is still ours.
    pub fn release(&mut self) -> Result<()> {
        let Some((stop, thread)) = self.renewer.take() else {
            return Ok(());
        };
        let _ = stop.send(());
        let _ = thread.join();
        let held = read(&self.client, &self.path, &self.url)?;
        if held.is_some_and(|v| v["holder"] == self.holder.as_str()) {
            block_on(self.client.delete(&self.path)).map_err(|e| describe(&self.url, &e))?;
        }
        Ok(())
    }
}

impl Drop for RemoteLock {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// This machine's name.
fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map_or_else(|| "?".into(), |h| h.trim().to_string())
}

/// Whether `holder` ("host:pid:nonce") was a process of this machine that no longer runs.
fn dead_here(holder: &str) -> bool {
    let mut parts = holder.split(':');
    let (Some(h), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    h == host()
        && pid
            .parse::<u32>()
            .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
}

/// The lock's record, None when there is none (or it is not JSON).
fn read(client: &Arc<dyn ObjectStore>, path: &ObjectPath, url: &str) -> Result<Option<Value>> {
    let got = block_on(async { client.get(path).await?.bytes().await });
    match got {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(ObjectError::NotFound { .. }) => Ok(None),
        Err(e) => Err(describe(url, &e)),
    }
}
