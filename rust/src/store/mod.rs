//! A dbcore store: one Zarr v3 group on the local filesystem or in an object store, holding
//! row-chunked arrays (zstd compressed, or uncompressed: the `bytes` codec alone), plus the
//! `dbcore` group attribute `{"format": 1, "complete": bool, "arrays": {...}}`.
//!
//! Corrupt stores are refused, never a panic: a failed read names the array and the chunk (its
//! index, rows and file), and sizes from metadata or a shard index are checked before anything is
//! allocated or sliced by them (`rust/tests/fuzz_reader.rs` fuzzes all of it).
//!
//! `Store` (this file) opens, creates and finalizes the group; `array` holds the open array and
//! its reads and writes, `raw` the direct reads of uncompressed chunks, `scatter` the output slots
//! of a gather, `names` the checked keys and names. Everything here is pure Rust (no Python);
//! `python.rs` is a thin layer over it.

mod array;
mod names;
mod raw;
mod scatter;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::{json, Map, Value};
use zarrs::array::codec::ZstdCodec;
use zarrs::array::{Array, ArrayBuilder, FillValue};
use zarrs::group::{Group, GroupBuilder};
use zarrs::node::Node;
use zarrs::storage::{ReadableWritableListableStorage, ReadableWritableListableStorageTraits};

use crate::error::{Error, Result};
use crate::location::Location;
use crate::remote::CachedStorage;
use names::{check_extra, check_name, exists_err, io_err, key, prefix};

pub use array::{ArrayHandle, ArraySpec, Compression};
pub use raw::{FileMaps, MAX_FILE_MAPS};
pub use scatter::Scatter;

/// Any zarrs storage: a local folder or an object store (`Location::storage`).
type Storage = dyn ReadableWritableListableStorageTraits;

/// Version of the layout described in the module docs; readers refuse newer ones.
pub const FORMAT_VERSION: u64 = 1;
/// The group attribute that holds dbcore's own bookkeeping.
pub const META_KEY: &str = "dbcore";

/// A Zarr v3 group, in a local folder or an object store.
pub struct Store {
    location: Location,
    storage: ReadableWritableListableStorage,
    /// Set when a remote store is read through the local disk cache.
    cached: Option<CachedStorage>,
    attrs: RwLock<Map<String, Value>>,
    arrays: RwLock<HashMap<String, Arc<ArrayHandle>>>,
}

/// Whether `storage` holds group metadata at its root (Zarr v3 or v2).
fn has_group(location: &Location, storage: &ReadableWritableListableStorage) -> Result<bool> {
    for name in ["zarr.json", ".zgroup"] {
        if storage
            .size_key(&key(name)?)
            .map_err(|e| io_err(location, e))?
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Store {
    /// Wrap `array` in a handle and keep it in the open-array cache.
    fn remember(&self, name: &str, array: Array<Storage>) -> Result<Arc<ArrayHandle>> {
        let handle = Arc::new(ArrayHandle::new(
            name,
            array,
            &self.location,
            &self.storage,
            self.cached.as_ref(),
        )?);
        self.arrays
            .write()
            .unwrap()
            .insert(name.to_string(), handle.clone());
        Ok(handle)
    }

    /// Create an empty, incomplete store at `location` (a local path or an object-store prefix).
    /// An existing store is an error unless `overwrite`, and even then only a Zarr store or an
    /// empty directory (or prefix) is deleted.
    pub fn create(
        location: impl Into<Location>,
        user_attrs: Map<String, Value>,
        overwrite: bool,
    ) -> Result<Self> {
        let location = location.into();
        if user_attrs.contains_key(META_KEY) {
            return Err(Error::Invalid(format!(
                "{location}: the attribute '{META_KEY}' is reserved"
            )));
        }
        let storage = match &location {
            Location::Local(path) => {
                if path.exists() || path.is_symlink() {
                    if !overwrite {
                        return Err(exists_err(&location));
                    }
                    remove_store(path)?;
                }
                std::fs::create_dir_all(path).map_err(|e| io_err(&location, e))?;
                location.storage()?
            }
            Location::S3 { .. } => {
                let storage = location.storage()?;
                let root = prefix("")?;
                let keys = storage
                    .list_prefix(&root)
                    .map_err(|e| io_err(&location, e))?;
                if !keys.is_empty() {
                    if !overwrite {
                        return Err(exists_err(&location));
                    }
                    if !keys.iter().any(|k| k.as_str() == "zarr.json") {
                        return Err(Error::Exists(format!(
                            "{location}: holds objects but no Zarr store; refusing to overwrite it"
                        )));
                    }
                    storage
                        .erase_prefix(&root)
                        .map_err(|e| io_err(&location, e))?;
                }
                storage
            }
        };
        let mut attrs = user_attrs;
        attrs.insert(
            META_KEY.into(),
            json!({"format": FORMAT_VERSION, "complete": false}),
        );
        let store = Store {
            location,
            storage,
            cached: None,
            attrs: RwLock::new(attrs),
            arrays: RwLock::new(HashMap::new()),
        };
        store.store_group_metadata()?;
        Ok(store)
    }

    /// Whether `location` holds a Zarr group (complete or not).
    pub fn exists(location: impl Into<Location>) -> Result<bool> {
        let location = location.into();
        if let Location::Local(path) = &location {
            if !path.is_dir() {
                return Ok(false);
            }
        }
        has_group(&location, &location.storage()?)
    }

    /// Open the group at `location`. With `require_complete`, only a finalized dbcore store of a
    /// known format whose recorded arrays are all present, with the recorded dtypes and shapes,
    /// opens.
    pub fn open(location: impl Into<Location>, require_complete: bool) -> Result<Self> {
        let location = location.into();
        if let Location::Local(path) = &location {
            if !path.is_dir() {
                return Err(Error::NotFound(format!(
                    "{location}: no such store (not a directory)"
                )));
            }
        }
        // A finalized store no longer changes: a remote one is read through the disk cache.
        let (storage, cached) = if require_complete {
            location.read_storage()?
        } else {
            (location.storage()?, None)
        };
        if !has_group(&location, &storage)? {
            return Err(Error::NotFound(format!(
                "{location}: not a Zarr group (no zarr.json)"
            )));
        }
        let group = Group::open(storage.clone(), "/").map_err(|e| {
            Error::Corrupt(format!("{location}: bad group metadata (zarr.json): {e}"))
        })?;
        let store = Store {
            location,
            storage,
            cached,
            attrs: RwLock::new(group.attributes().clone()),
            arrays: RwLock::new(HashMap::new()),
        };
        if require_complete {
            store.check_complete()?;
        }
        Ok(store)
    }

    fn check_complete(&self) -> Result<()> {
        let p = &self.location;
        let meta = self.attrs.read().unwrap().get(META_KEY).cloned();
        let Some(meta) = meta else {
            return Err(Error::Incomplete(format!(
                "{p}: not a dbcore store (no '{META_KEY}' group attribute); \
                 open it with require_complete=False to read a group written by another tool"
            )));
        };
        let format = meta.get("format").and_then(Value::as_u64);
        match format {
            Some(f) if f <= FORMAT_VERSION => {}
            Some(f) => {
                return Err(Error::Corrupt(format!(
                    "{p}: written in dbcore store format {f}, newer than this dbcore reads ({FORMAT_VERSION})"
                )))
            }
            None => {
                return Err(Error::Corrupt(format!(
                    "{p}: bad '{META_KEY}' attribute (no format version): {meta}"
                )))
            }
        }
        if meta.get("complete").and_then(Value::as_bool) != Some(true) {
            return Err(Error::Incomplete(format!(
                "{p}: incomplete store: it was never finalized (its writer crashed, was \
                 interrupted or is still running); run the command that wrote it again to resume \
                 it"
            )));
        }
        let recorded = meta
            .get("arrays")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (name, want) in recorded {
            let h = self.array(&name).map_err(|e| match e {
                Error::NotFound(m) => Error::Corrupt(format!("{m} (the store records it)")),
                e => e,
            })?;
            let got = json!({"shape": h.shape(), "dtype": h.dtype().name()});
            if got != want {
                return Err(Error::Corrupt(format!(
                    "{p}: array '{name}': is {got} but the store recorded {want}"
                )));
            }
        }
        Ok(())
    }

    /// Where the store lives (displays as its path or URL).
    pub fn root(&self) -> &Location {
        &self.location
    }

    /// The bytes of `name`, a file of the group that is not an array (e.g. a writer's ledger).
    pub fn get_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_extra(name)?;
        let got = self
            .storage
            .get(&key(name)?)
            .map_err(|e| io_err(&self.location, e))?;
        Ok(got.map(|b| b.to_vec()))
    }

    /// Write (replace) `name`, a file of the group that is not an array.
    pub fn set_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_extra(name)?;
        self.storage
            .set(&key(name)?, bytes.to_vec().into())
            .map_err(|e| io_err(&self.location, e))
    }

    /// Delete `name`, a file of the group that is not an array (no error if there is none).
    pub fn erase(&self, name: &str) -> Result<()> {
        check_extra(name)?;
        self.storage
            .erase(&key(name)?)
            .map_err(|e| io_err(&self.location, e))
    }

    /// Bytes stored for array `name` (metadata, chunks and shards).
    pub fn stored_bytes(&self, name: &str) -> Result<u64> {
        check_name(name)?;
        self.storage
            .size_prefix(&prefix(&format!("{name}/"))?)
            .map_err(|e| io_err(&self.location, e))
    }

    /// All group attributes, `dbcore` included.
    pub fn attrs(&self) -> Map<String, Value> {
        self.attrs.read().unwrap().clone()
    }

    fn store_group_metadata(&self) -> Result<()> {
        let attrs = self.attrs.read().unwrap().clone();
        GroupBuilder::new()
            .attributes(attrs)
            .build(self.storage.clone(), "/")
            .map_err(|e| io_err(&self.location, e))?
            .store_metadata()
            .map_err(|e| io_err(&self.location, e))
    }

    /// Names of the arrays directly in the group, sorted.
    pub fn array_names(&self) -> Result<Vec<String>> {
        let group = Group::open(self.storage.clone(), "/")
            .map_err(|e| Error::Corrupt(format!("{}: bad group metadata: {e}", self.location)))?;
        let paths = group.child_array_paths().map_err(|e| {
            // name the child whose metadata does not open
            let p = &self.location;
            match self.bad_child() {
                Some(n) => {
                    Error::Corrupt(format!("{p}: array '{n}': bad metadata (zarr.json): {e}"))
                }
                None => Error::Corrupt(format!("{p}: cannot list arrays: {e}")),
            }
        })?;
        let mut names: Vec<String> = paths
            .iter()
            .map(|p| p.as_str().trim_start_matches('/').to_string())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The first child (by name) holding a zarr.json whose metadata does not open.
    fn bad_child(&self) -> Option<String> {
        let listed = self.storage.list_dir(&prefix("").ok()?).ok()?;
        let has_metadata = |n: &str| {
            let k = key(&format!("{n}/zarr.json")).ok()?;
            self.storage.size_key(&k).ok().flatten()
        };
        let mut children: Vec<String> = listed
            .prefixes()
            .iter()
            .map(|p| p.as_str().trim_end_matches('/').to_string())
            .filter(|n| has_metadata(n).is_some())
            .collect();
        children.sort();
        children
            .into_iter()
            .find(|n| Node::open(&self.storage, &format!("/{n}")).is_err())
    }

    /// The open array `name` (opened once, then cached).
    pub fn array(&self, name: &str) -> Result<Arc<ArrayHandle>> {
        if let Some(h) = self.arrays.read().unwrap().get(name) {
            return Ok(h.clone());
        }
        check_name(name)?;
        let p = &self.location;
        let mut found = false;
        for meta in ["zarr.json", ".zarray"] {
            let size = self.storage.size_key(&key(&format!("{name}/{meta}"))?);
            found |= size.map_err(|e| io_err(p, e))?.is_some();
        }
        if !found {
            return Err(Error::NotFound(format!(
                "{p}: array '{name}': no such array"
            )));
        }
        let array = Array::open(self.storage.clone(), &format!("/{name}")).map_err(|e| {
            Error::Corrupt(format!(
                "{p}: array '{name}': bad metadata (zarr.json): {e}"
            ))
        })?;
        self.remember(name, array)
    }

    /// Create array `name` (metadata only); fill it with `ArrayHandle::write_rows`.
    pub fn create_array(&self, name: &str, spec: &ArraySpec) -> Result<Arc<ArrayHandle>> {
        check_name(name)?;
        let p = &self.location;
        let taken = match &self.location {
            Location::Local(path) => path.join(name).exists(),
            Location::S3 { .. } => !self
                .storage
                .list_prefix(&prefix(&format!("{name}/"))?)
                .map_err(|e| io_err(p, e))?
                .is_empty(),
        };
        if taken {
            return Err(Error::Exists(format!("{p}: array '{name}' already exists")));
        }
        if spec.shape.is_empty() {
            return Err(Error::Invalid(format!(
                "{p}: array '{name}': needs at least one dimension (rows)"
            )));
        }
        let mut chunk: Vec<u64> = spec.shape.iter().map(|&d| d.max(1)).collect();
        chunk[0] = spec.chunk_rows.max(1);
        let mut builder_shape = chunk.clone();
        if let Some(s) = spec.shard_rows {
            if s == 0 || s % chunk[0] != 0 {
                return Err(Error::Invalid(format!(
                    "{p}: array '{name}': shard rows {s} are not a multiple of chunk rows {}",
                    chunk[0]
                )));
            }
            builder_shape[0] = s;
        }
        let mut builder = ArrayBuilder::new(
            spec.shape.clone(),
            builder_shape,
            spec.dtype.name(),
            FillValue::new(vec![0u8; spec.dtype.size()]),
        );
        if let Compression::Zstd(level) = spec.compression {
            builder.bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(level, true))]);
        }
        if spec.shard_rows.is_some() {
            builder.subchunk_shape(chunk);
        }
        let array = builder
            .build(self.storage.clone(), &format!("/{name}"))
            .map_err(|e| Error::Invalid(format!("{p}: array '{name}': {e}")))?;
        array
            .store_metadata()
            .map_err(|e| io_err(&self.location, e))?;
        self.mark_incomplete()?;
        self.remember(name, array)
    }

    /// A finalized store that gains an array is incomplete again until the next `finalize`.
    fn mark_incomplete(&self) -> Result<()> {
        let mut attrs = self.attrs.write().unwrap();
        let Some(meta) = attrs.get_mut(META_KEY).and_then(Value::as_object_mut) else {
            return Ok(()); // a group written by another tool: leave its attributes alone
        };
        if meta.get("complete") == Some(&Value::Bool(false)) {
            return Ok(());
        }
        meta.insert("complete".into(), Value::Bool(false));
        drop(attrs);
        self.store_group_metadata()
    }

    /// Record every array's shape and dtype and mark the store complete.
    pub fn finalize(&self) -> Result<()> {
        let mut recorded = Map::new();
        for name in self.array_names()? {
            let h = self.array(&name)?;
            recorded.insert(name, json!({"shape": h.shape(), "dtype": h.dtype().name()}));
        }
        self.attrs.write().unwrap().insert(
            META_KEY.into(),
            json!({"format": FORMAT_VERSION, "complete": true, "arrays": recorded}),
        );
        self.store_group_metadata()
    }
}

/// Delete an old store before overwriting it, refusing anything that does not look like one.
fn remove_store(path: &Path) -> Result<()> {
    let err = |e: std::io::Error| io_err(&path.display(), e);
    if !path.is_dir() || path.is_symlink() {
        return Err(Error::Exists(format!(
            "{}: exists and is not a directory; refusing to overwrite it",
            path.display()
        )));
    }
    let empty = std::fs::read_dir(path).map_err(err)?.next().is_none();
    if !empty && !path.join("zarr.json").is_file() {
        return Err(Error::Exists(format!(
            "{}: exists and is not a Zarr store; refusing to overwrite it",
            path.display()
        )));
    }
    std::fs::remove_dir_all(path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// An int32 array of `shape`, zstd compressed.
    pub(super) fn spec(shape: Vec<u64>, chunk_rows: u64, shard_rows: Option<u64>) -> ArraySpec {
        ArraySpec {
            shape,
            dtype: DType::Int32,
            chunk_rows,
            shard_rows,
            compression: Compression::Zstd(3),
        }
    }

    /// The int32 values 0..n, as bytes.
    pub(super) fn data(n: usize) -> Vec<u8> {
        (0..n as i32).flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn refuses_incomplete_existing_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.zarr");
        Store::create(&path, Map::new(), false).unwrap();
        assert!(matches!(
            Store::open(&path, true),
            Err(Error::Incomplete(_))
        ));
        assert!(Store::open(&path, false).is_ok());
        assert!(matches!(
            Store::create(&path, Map::new(), false),
            Err(Error::Exists(_))
        ));
        assert!(Store::create(&path, Map::new(), true).is_ok());
        assert!(matches!(
            Store::open(dir.path().join("no"), false),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn overwrite_refuses_a_non_store_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), "x").unwrap();
        assert!(matches!(
            Store::create(dir.path(), Map::new(), true),
            Err(Error::Exists(_))
        ));
        assert!(dir.path().join("precious.txt").exists());
    }
}
