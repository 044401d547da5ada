//! A finalized remote store read through the local disk cache: its objects listed once (sizes and
//! ETags, no size request per read), each object downloaded whole, once, into the cache (several
//! in flight, deduplicated among threads), and every read served from the local file.
//!
//! Writes, lists and erasures go to the bucket (a finalized store is rarely written; a written
//! key is looked up again before its next read).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use futures::StreamExt;
use zarrs::storage::byte_range::ByteRangeIterator;
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, OffsetBytesIterator, ReadableStorageTraits,
    ReadableWritableListableStorage, StorageError, StoreKey, StoreKeys, StoreKeysPrefixes,
    StorePrefix, WritableStorageTraits,
};
use zarrs_object_store::object_store::path::Path as ObjectPath;
use zarrs_object_store::object_store::{
    Error as ObjectError, GetOptions, ObjectStore, ObjectStoreExt,
};

use super::client::{block_on, describe, runtime};
use super::disk::{touch, DiskCache};
use crate::error::{Error, Result};

/// Downloads in flight at once, per store.
pub const IN_FLIGHT: usize = 16;

/// An object as listed.
#[derive(Clone, Debug)]
struct Listed {
    size: u64,
    etag: Option<String>,
}

/// Where a key stands in the cache (`CachedStorage::lookup`).
enum Lookup {
    OnDisk(PathBuf),
    Absent,
    ToFetch(Listed, PathBuf),
}

/// A download that threads may wait for.
#[derive(Default)]
struct Pending {
    done: Mutex<Option<std::result::Result<PathBuf, String>>>,
    ready: Condvar,
}

impl Pending {
    fn finish(&self, result: std::result::Result<PathBuf, String>) {
        *self.done.lock().unwrap() = Some(result);
        self.ready.notify_all();
    }

    fn wait(&self) -> std::result::Result<PathBuf, String> {
        let mut done = self.done.lock().unwrap();
        while done.is_none() {
            done = self.ready.wait(done).unwrap();
        }
        done.clone().unwrap()
    }
}

struct Inner {
    url: String,
    remote: Arc<dyn ObjectStore>,
    folder: PathBuf,
    disk: Arc<DiskCache>,
    listing: RwLock<HashMap<String, Listed>>,
    /// Keys written through this storage since the listing: looked up again before a read.
    written: Mutex<HashSet<String>>,
    pending: Mutex<HashMap<String, Arc<Pending>>>,
    /// Entries this process found complete (or downloaded): not checked again until forgotten.
    ready: Mutex<HashMap<String, PathBuf>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Objects downloaded by this process.
    downloads: std::sync::atomic::AtomicU64,
}

/// A remote store read through the disk cache (see the module docs).
#[derive(Clone)]
pub struct CachedStorage {
    inner: Arc<Inner>,
    /// Writes, lists and erasures.
    direct: ReadableWritableListableStorage,
}

impl CachedStorage {
    /// List the store at `url` (one request per thousand objects) and read it through `disk`.
    pub fn open(
        url: &str,
        remote: Arc<dyn ObjectStore>,
        direct: ReadableWritableListableStorage,
        disk: Arc<DiskCache>,
    ) -> Result<CachedStorage> {
        let listed = block_on(async {
            let mut out = HashMap::new();
            let mut items = remote.list(None);
            while let Some(item) = items.next().await {
                let meta = item?;
                out.insert(
                    meta.location.to_string(),
                    Listed {
                        size: meta.size,
                        etag: meta.e_tag,
                    },
                );
            }
            Ok::<_, ObjectError>(out)
        })
        .map_err(|e| describe(url, &e))?;
        Ok(CachedStorage {
            inner: Arc::new(Inner {
                url: url.to_string(),
                remote,
                folder: disk.folder(url),
                disk,
                listing: RwLock::new(listed),
                written: Mutex::new(HashSet::new()),
                pending: Mutex::new(HashMap::new()),
                ready: Mutex::new(HashMap::new()),
                slots: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
                downloads: Default::default(),
            }),
            direct,
        })
    }

    /// The disk cache's limit in bytes.
    pub fn limit(&self) -> u64 {
        self.inner.disk.settings.limit
    }

    /// Bytes of the store's objects under `prefix` (an array's folder), as listed.
    pub fn stored_bytes(&self, prefix: &str) -> u64 {
        let listing = self.inner.listing.read().unwrap();
        listing
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, l)| l.size)
            .sum()
    }

    /// Objects this storage downloaded.
    pub fn downloads(&self) -> u64 {
        self.inner
            .downloads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The local file holding `key`, downloaded first if the cache lacks it; None when the store
    /// has no such object.
    pub fn file(&self, key: &str) -> Result<Option<PathBuf>> {
        match self.lookup(key)? {
            Lookup::OnDisk(path) => Ok(Some(path)),
            Lookup::Absent => Ok(None),
            Lookup::ToFetch(listed, path) => self
                .start(key, listed, path)
                .wait()
                .map(Some)
                .map_err(Error::Io),
        }
    }

    /// Start downloading the objects of `keys` the cache lacks (at most `IN_FLIGHT` at once);
    /// returns at once.
    pub fn prefetch<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if let Ok(Lookup::ToFetch(listed, path)) = self.lookup(key) {
                self.start(key, listed, path);
            }
        }
    }

    /// Where `key` stands: complete on disk, not in the store, or to download into its entry.
    fn lookup(&self, key: &str) -> Result<Lookup> {
        if let Some(path) = self.inner.ready.lock().unwrap().get(key) {
            return Ok(Lookup::OnDisk(path.clone()));
        }
        let Some(listed) = self.inner.listed(key)? else {
            return Ok(Lookup::Absent);
        };
        let path = self.inner.entry(key, &listed);
        Ok(if self.inner.holds(key, &path, &listed) {
            Lookup::OnDisk(path)
        } else {
            Lookup::ToFetch(listed, path)
        })
    }

    /// The download of `key` into `path`, started unless one is under way.
    fn start(&self, key: &str, listed: Listed, path: PathBuf) -> Arc<Pending> {
        let mut pending = self.inner.pending.lock().unwrap();
        if let Some(p) = pending.get(key) {
            return p.clone();
        }
        let p = Arc::new(Pending::default());
        pending.insert(key.to_string(), p.clone());
        drop(pending);
        let (inner, key, task) = (self.inner.clone(), key.to_string(), p.clone());
        runtime().spawn(async move {
            let result = inner.download(&key, &listed, &path).await;
            inner.pending.lock().unwrap().remove(&key);
            task.finish(result.map(|()| path).map_err(|e| e.to_string()));
        });
        p
    }

    /// `open(path)` of the local file of `key` (downloaded first if the cache lacks it); None
    /// when the store has no such object. A file that `open` finds gone (`Ok(None)`: evicted by
    /// another download or process) is downloaded again, `EVICTED_RETRIES` times at most; then
    /// the error names `what()`.
    pub fn with_file<T>(
        &self,
        key: &str,
        what: impl FnOnce() -> String,
        mut open: impl FnMut(&Path) -> Result<Option<T>>,
    ) -> Result<Option<(PathBuf, T)>> {
        for _ in 0..EVICTED_RETRIES {
            let Some(path) = self.file(key)? else {
                return Ok(None);
            };
            if let Some(opened) = open(&path)? {
                return Ok(Some((path, opened)));
            }
            self.forget(key);
        }
        Err(evicted(&what()))
    }

    /// The local file of `key` opened: see `with_file`.
    fn open_file(&self, key: &str) -> Result<Option<std::fs::File>> {
        let opened = self.with_file(
            key,
            || format!("{}/{key}", self.inner.url),
            |path| match std::fs::File::open(path) {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::Io(format!("{}: {e}", path.display()))),
            },
        )?;
        Ok(opened.map(|(_, f)| f))
    }

    /// The local file of `key` vanished: check it again next time.
    fn forget(&self, key: &str) {
        self.inner.ready.lock().unwrap().remove(key);
    }

    fn storage_err(e: Error) -> StorageError {
        StorageError::Other(e.to_string())
    }

    fn written(&self, key: &str) {
        self.forget(key);
        self.inner.listing.write().unwrap().remove(key);
        self.inner.written.lock().unwrap().insert(key.to_string());
    }
}

impl Inner {
    /// The object's size and ETag: from the listing, or looked up when written since.
    fn listed(&self, key: &str) -> Result<Option<Listed>> {
        if let Some(l) = self.listing.read().unwrap().get(key) {
            return Ok(Some(l.clone()));
        }
        if !self.written.lock().unwrap().contains(key) {
            return Ok(None);
        }
        let head = block_on(self.remote.head(&ObjectPath::from(key)));
        let listed = match head {
            Ok(meta) => Listed {
                size: meta.size,
                etag: meta.e_tag,
            },
            Err(ObjectError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(describe(&format!("{}/{key}", self.url), &e)),
        };
        self.written.lock().unwrap().remove(key);
        self.listing
            .write()
            .unwrap()
            .insert(key.to_string(), listed.clone());
        Ok(Some(listed))
    }

    /// The cache entry of `key` as listed: `KEY#ETAG` (or `KEY#SIZE` without an ETag).
    fn entry(&self, key: &str, listed: &Listed) -> PathBuf {
        let tag: String = match &listed.etag {
            Some(e) => e
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect(),
            None => format!("size{}", listed.size),
        };
        self.folder.join(format!("{key}#{tag}"))
    }

    /// Whether the cache holds `path` complete (then marked used, and ready for this process).
    fn holds(&self, key: &str, path: &PathBuf, listed: &Listed) -> bool {
        let ok = std::fs::metadata(path).is_ok_and(|m| m.len() == listed.size);
        if ok {
            touch(path);
            self.ready
                .lock()
                .unwrap()
                .insert(key.to_string(), path.clone());
        }
        ok
    }

    /// Download `key` whole into `path` (through a `.part` file, renamed when complete).
    async fn download(&self, key: &str, listed: &Listed, path: &PathBuf) -> Result<()> {
        let _slot = self.slots.acquire().await.expect("semaphore open");
        let url = format!("{}/{key}", self.url);
        let io = |e: std::io::Error| Error::Io(format!("{url}: cache {}: {e}", path.display()));
        self.disk.make_room(listed.size, None)?;
        let parent = path.parent().expect("an entry has a folder");
        std::fs::create_dir_all(parent).map_err(io)?;
        let name = path.file_name().unwrap().to_string_lossy();
        // Unique to this download (two handles of one store may fetch one key at once).
        static PARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let part = parent.join(format!(".{name}.{}.{n}.part", std::process::id()));
        let options = GetOptions {
            if_match: listed.etag.clone(),
            ..Default::default()
        };
        let got = self.remote.get_opts(&ObjectPath::from(key), options).await;
        let got = match got {
            Ok(g) => g,
            Err(ObjectError::Precondition { .. }) => return Err(changed(&url)),
            Err(e) => return Err(describe(&url, &e)),
        };
        let mut file = std::fs::File::create(&part).map_err(io)?;
        let mut body = got.into_stream();
        let mut bytes = 0u64;
        let written = async {
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|e| describe(&url, &e))?;
                bytes += piece.len() as u64;
                file.write_all(&piece).map_err(io)?;
            }
            Ok::<_, Error>(())
        }
        .await;
        let done = written.and_then(|()| {
            if bytes != listed.size {
                return Err(changed(&url));
            }
            std::fs::rename(&part, path).map_err(io)
        });
        if done.is_err() {
            let _ = std::fs::remove_file(&part);
            return done;
        }
        self.downloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ready
            .lock()
            .unwrap()
            .insert(key.to_string(), path.clone());
        // Downloads in flight together may overshoot the limit: trim back, keeping this one.
        self.disk.make_room(0, Some(path))
    }
}

/// Downloads of a file that other downloads evict before it is opened, before giving up.
const EVICTED_RETRIES: usize = 3;

/// The error when a file keeps being evicted before it is read.
fn evicted(what: &str) -> Error {
    Error::Io(format!(
        "{what}: evicted from the disk cache while in use, {EVICTED_RETRIES} times; raise \
         DBCORE_CACHE_LIMIT"
    ))
}

fn changed(url: &str) -> Error {
    Error::Io(format!(
        "{url}: the object changed while the store was read (another writer?); open the store again"
    ))
}

impl ReadableStorageTraits for CachedStorage {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> std::result::Result<MaybeBytesIterator<'a>, StorageError> {
        let Some(file) = self.open_file(key.as_str()).map_err(Self::storage_err)? else {
            return Ok(None);
        };
        let size = file.metadata()?.len();
        let mut out = Vec::new();
        for range in byte_ranges {
            let r = range.to_range(size);
            if r.end > size || r.start > r.end {
                return Err(StorageError::Other(format!(
                    "{}/{key}: bytes {r:?} are past its end ({size})",
                    self.inner.url
                )));
            }
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            file.read_exact_at(&mut buf, r.start)?;
            out.push(Ok(Bytes::from(buf)));
        }
        Ok(Some(Box::new(out.into_iter())))
    }

    fn size_key(&self, key: &StoreKey) -> std::result::Result<Option<u64>, StorageError> {
        Ok(self
            .inner
            .listed(key.as_str())
            .map_err(Self::storage_err)?
            .map(|l| l.size))
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

impl WritableStorageTraits for CachedStorage {
    fn set(&self, key: &StoreKey, value: Bytes) -> std::result::Result<(), StorageError> {
        self.written(key.as_str());
        self.direct.set(key, value)
    }

    fn set_partial_many(
        &self,
        key: &StoreKey,
        offset_values: OffsetBytesIterator,
    ) -> std::result::Result<(), StorageError> {
        self.written(key.as_str());
        self.direct.set_partial_many(key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> std::result::Result<(), StorageError> {
        self.written(key.as_str());
        self.direct.erase(key)
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> std::result::Result<(), StorageError> {
        let keys: Vec<String> = (self.inner.listing.read().unwrap().keys())
            .filter(|k| k.starts_with(prefix.as_str()))
            .cloned()
            .collect();
        for k in keys {
            self.written(&k);
        }
        self.direct.erase_prefix(prefix)
    }

    fn supports_set_partial(&self) -> bool {
        self.direct.supports_set_partial()
    }
}

impl ListableStorageTraits for CachedStorage {
    fn list(&self) -> std::result::Result<StoreKeys, StorageError> {
        self.direct.list()
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeys, StorageError> {
        self.direct.list_prefix(prefix)
    }

    fn list_dir(
        &self,
        prefix: &StorePrefix,
    ) -> std::result::Result<StoreKeysPrefixes, StorageError> {
        self.direct.list_dir(prefix)
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> std::result::Result<u64, StorageError> {
        self.direct.size_prefix(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::disk::Settings;
    use zarrs::storage::byte_range::ByteRange;
    use zarrs::storage::storage_adapter::async_to_sync::{
        AsyncToSyncBlockOn, AsyncToSyncStorageAdapter,
    };
    use zarrs_object_store::object_store::memory::InMemory;
    use zarrs_object_store::object_store::ObjectStoreExt;
    use zarrs_object_store::AsyncObjectStore;

    #[derive(Clone, Copy)]
    struct On;
    impl AsyncToSyncBlockOn for On {
        fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
            block_on(future)
        }
    }

    /// An in-memory bucket holding `objects`, and a cache folder.
    fn bucket(objects: &[(&str, &[u8])]) -> (tempfile::TempDir, Arc<dyn ObjectStore>) {
        let remote: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        for (key, bytes) in objects {
            put(&remote, key, bytes);
        }
        (tempfile::tempdir().unwrap(), remote)
    }

    fn put(remote: &Arc<dyn ObjectStore>, key: &str, bytes: &[u8]) {
        block_on(remote.put(&ObjectPath::from(key), bytes.to_vec().into())).unwrap();
    }

    fn open(remote: &Arc<dyn ObjectStore>, dir: &std::path::Path, limit: u64) -> CachedStorage {
        let direct = Arc::new(AsyncToSyncStorageAdapter::new(
            Arc::new(AsyncObjectStore::new(remote.clone())),
            On,
        ));
        let disk = Arc::new(DiskCache::new(Settings {
            dir: dir.to_path_buf(),
            limit,
        }));
        CachedStorage::open("s3://b/s.zarr", remote.clone(), direct, disk).unwrap()
    }

    #[test]
    fn objects_are_downloaded_once_and_served_from_the_disk() {
        let (dir, remote) = bucket(&[("x/c/0", b"0123456789")]);
        let c = open(&remote, dir.path(), 1 << 20);
        let key = StoreKey::new("x/c/0").unwrap();
        assert_eq!(c.size_key(&key).unwrap(), Some(10));
        let got = c
            .get_partial(&key, ByteRange::FromStart(2, Some(3)))
            .unwrap();
        assert_eq!(got.unwrap().as_ref(), b"234");
        assert_eq!(c.get(&key).unwrap().unwrap().as_ref(), b"0123456789");
        assert_eq!(c.downloads(), 1);
        assert!(c.get(&StoreKey::new("x/c/9").unwrap()).unwrap().is_none());
        // A second reader (a new process) finds it on disk.
        let again = open(&remote, dir.path(), 1 << 20);
        assert_eq!(again.get(&key).unwrap().unwrap().as_ref(), b"0123456789");
        assert_eq!(again.downloads(), 0);
    }

    #[test]
    fn a_rewritten_object_is_a_new_entry_and_a_vanished_one_is_fetched_again() {
        let (dir, remote) = bucket(&[("k", b"old")]);
        let key = StoreKey::new("k").unwrap();
        assert_eq!(
            open(&remote, dir.path(), 1 << 20)
                .get(&key)
                .unwrap()
                .unwrap()
                .as_ref(),
            b"old"
        );
        put(&remote, "k", b"new!");
        let c = open(&remote, dir.path(), 1 << 20);
        assert_eq!(c.get(&key).unwrap().unwrap().as_ref(), b"new!");
        // evicted by another process after this one found it
        std::fs::remove_file(c.file("k").unwrap().unwrap()).unwrap();
        assert_eq!(c.get(&key).unwrap().unwrap().as_ref(), b"new!");
        assert_eq!(c.downloads(), 2);
    }

    #[test]
    fn an_object_changed_after_the_listing_is_refused() {
        let (dir, remote) = bucket(&[("k", b"listed")]);
        let c = open(&remote, dir.path(), 1 << 20);
        put(&remote, "k", b"rewritten");
        let err = c.file("k").unwrap_err().to_string();
        assert!(err.contains("changed while the store was read"), "{err}");
    }
}
