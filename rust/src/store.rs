//! A dbcore store: one Zarr v3 group on the local filesystem holding row-chunked arrays (zstd
//! compressed, or uncompressed: the `bytes` codec alone), plus the `dbcore` group attribute
//! `{"format": 1, "complete": bool, "arrays": {...}}`.
//!
//! Reads of an uncompressed array whose rows lie contiguously in its chunks (every dbcore array:
//! chunks span all axes but the first) skip the codec pipeline: each row is read from its chunk
//! (or inner chunk of a shard, located through the cached shard index) straight into its output
//! slot with one `pread`, or, for a reader that keeps `FileMaps` (a stream), with a user-space
//! `memcpy` out of a read-only map of the file. Uncompressed chunks carry no checksum (a shard's
//! index keeps its crc32c): a truncated chunk or shard is detected, a flipped bit inside one is not.
//!
//! Corrupt stores are refused, never a panic: a failed read names the array and the chunk (its
//! index, rows and file), and sizes from metadata or a shard index are checked before anything is
//! allocated or sliced by them (`rust/tests/fuzz_reader.rs` fuzzes all of it).
//!
//! Everything here is pure Rust (no Python); `python.rs` is a thin layer over it.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use unsafe_cell_slice::UnsafeCellSlice;
use zarrs::array::codec::ZstdCodec;
use zarrs::array::{
    Array, ArrayBuilder, ArrayBytes, ArrayBytesFixedDisjointView, ArrayMetadata, ArrayShardedExt,
    ArrayShardedReadableExt, ArrayShardedReadableExtCache, ArraySubset, CodecOptions, FillValue,
};
use zarrs::group::{Group, GroupBuilder};
use zarrs::node::Node;
use zarrs::storage::{
    ReadableWritableListableStorage, ReadableWritableListableStorageTraits, StoreKey, StorePrefix,
};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gather;
use crate::location::Location;

/// Any zarrs storage: a local folder or an object store (`Location::storage`).
type Storage = dyn ReadableWritableListableStorageTraits;

/// How the chunks of a new array are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// The `bytes` codec alone: chunks hold the raw little-endian rows.
    None,
    /// `bytes` then `zstd` at this level, with zstd's checksum.
    Zstd(i32),
}

impl Compression {
    /// `"zstd"` (at `level`) or `"none"`.
    pub fn from_name(name: &str, level: i32) -> Result<Compression> {
        match name {
            "zstd" => Ok(Compression::Zstd(level)),
            "none" => Ok(Compression::None),
            _ => Err(Error::Invalid(format!(
                "compression must be 'zstd' or 'none', got {name:?}"
            ))),
        }
    }
}

/// Version of the layout described in the module docs; readers refuse newer ones.
pub const FORMAT_VERSION: u64 = 1;
/// The group attribute that holds dbcore's own bookkeeping.
pub const META_KEY: &str = "dbcore";

/// How to lay out a new array.
#[derive(Clone, Debug)]
pub struct ArraySpec {
    pub shape: Vec<u64>,
    pub dtype: DType,
    /// Rows per chunk (the unit of compression and of reading).
    pub chunk_rows: u64,
    /// Rows per shard (a multiple of `chunk_rows`), or None for one file per chunk.
    pub shard_rows: Option<u64>,
    pub compression: Compression,
}

/// An open array with what reads need; shared by all readers.
pub struct ArrayHandle {
    pub name: String,
    root: String,
    storage: ReadableWritableListableStorage,
    array: Array<Storage>,
    dtype: DType,
    row_bytes: usize,
    /// Rows per read unit: the inner chunk when sharded, else the chunk.
    unit_rows: u64,
    shard_cache: Option<ArrayShardedReadableExtCache>,
    /// Bytes of a shard's index at least (16 per inner chunk; u64::MAX past 64 bits), 0 unsharded.
    index_bytes: u64,
    /// Set when chunks hold raw rows that reads may take straight from the files.
    raw: Option<Raw>,
}

/// Direct access to the rows of an uncompressed array (see the module docs).
struct Raw {
    /// The store's folder (raw reads need files).
    folder: PathBuf,
    /// Rows per shard (the grid's chunk) when sharded, else None.
    shard_rows: Option<u64>,
}

/// A Zarr v3 group, in a local folder or an object store.
pub struct Store {
    location: Location,
    storage: ReadableWritableListableStorage,
    attrs: RwLock<Map<String, Value>>,
    arrays: RwLock<HashMap<String, Arc<ArrayHandle>>>,
}

fn io_err(root: &impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{root}: {e}"))
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

fn exists_err(location: &Location) -> Error {
    Error::Exists(format!(
        "{location}: already exists (pass overwrite=True to replace it)"
    ))
}

fn key(text: &str) -> Result<StoreKey> {
    StoreKey::new(text).map_err(|e| Error::Invalid(format!("invalid store key {text:?}: {e}")))
}

fn prefix(text: &str) -> Result<StorePrefix> {
    StorePrefix::new(text)
        .map_err(|e| Error::Invalid(format!("invalid store prefix {text:?}: {e}")))
}

/// A file of the group that is no array: a plain name (no folder), not the group's metadata.
fn check_extra(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name == "zarr.json" || name == ".zgroup" {
        return Err(Error::Invalid(format!("invalid store file name {name:?}")));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.starts_with("__")
        && !name.contains(['/', '\\'])
        && name != "zarr.json";
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid array name {name:?}")))
    }
}

impl Store {
    /// Wrap `array` in a handle and keep it in the open-array cache.
    fn remember(&self, name: &str, array: Array<Storage>) -> Result<Arc<ArrayHandle>> {
        let handle = Arc::new(ArrayHandle::new(
            name,
            array,
            &self.location,
            &self.storage,
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
        let storage = location.storage()?;
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
                 interrupted or is still running); rewrite it, or pass require_complete=False"
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
            let got = json!({"shape": h.shape(), "dtype": h.dtype.name()});
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
            recorded.insert(name, json!({"shape": h.shape(), "dtype": h.dtype.name()}));
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

impl ArrayHandle {
    fn new(
        name: &str,
        array: Array<Storage>,
        location: &Location,
        storage: &ReadableWritableListableStorage,
    ) -> Result<Self> {
        let p = location;
        let dtype_name = match array.metadata() {
            ArrayMetadata::V3(m) => m.data_type.name().to_string(),
            ArrayMetadata::V2(_) => {
                return Err(Error::DType(format!(
                    "{p}: array '{name}': Zarr v2 arrays are not supported"
                )))
            }
        };
        let dtype = DType::from_name(&dtype_name)
            .map_err(|e| Error::DType(format!("{p}: array '{name}': {e}")))?;
        if array.dimensionality() == 0 {
            return Err(Error::Invalid(format!(
                "{p}: array '{name}': 0-d arrays are not supported"
            )));
        }
        let zeros = vec![0u64; array.dimensionality()];
        let chunk = array
            .chunk_shape(&zeros)
            .map_err(|e| Error::Corrupt(format!("{p}: array '{name}': {e}")))?;
        let inner = array.subchunk_shape();
        if let Some(bad) = [Some(&chunk), inner.as_ref()]
            .into_iter()
            .flatten()
            .find(|c| c.len() != array.dimensionality())
        {
            return Err(Error::Corrupt(format!(
                "{p}: array '{name}': chunk shape {bad:?} does not match shape {:?}",
                array.shape()
            )));
        }
        let unit = match array.effective_subchunk_shape() {
            Some(s) if array.is_exclusively_sharded() => s[0].get(),
            _ => chunk[0].get(),
        };
        // Sizes from metadata are checked: a corrupt shape must not overflow or allocate.
        let too_large = |what: String| {
            Error::Corrupt(format!(
                "{p}: array '{name}': {what} do not fit in 64-bit byte counts"
            ))
        };
        let shape = array.shape();
        let row_bytes = shape[1..]
            .iter()
            .try_fold(dtype.size() as u64, |b, &d| b.checked_mul(d))
            .filter(|&b| usize::try_from(b).is_ok())
            .ok_or_else(|| too_large(format!("rows of shape {:?}", &shape[1..])))?;
        if shape[0].checked_mul(row_bytes).is_none() || unit.checked_mul(row_bytes).is_none() {
            return Err(too_large(format!(
                "{} rows (read units of {unit}) of {row_bytes} bytes",
                shape[0]
            )));
        }
        for c in [Some(&chunk), inner.as_ref()].into_iter().flatten() {
            let bytes = c
                .iter()
                .try_fold(dtype.size() as u64, |b, d| b.checked_mul(d.get()));
            if bytes.is_none() {
                return Err(too_large(format!("chunks of shape {c:?}")));
            }
        }
        let shard_cache = array
            .is_exclusively_sharded()
            .then(|| ArrayShardedReadableExtCache::new(&array));
        let index_bytes = match (&shard_cache, &inner) {
            (Some(_), Some(inner)) => std::iter::zip(chunk.iter(), inner.iter())
                .try_fold(16u64, |b, (c, i)| b.checked_mul(c.get().div_ceil(i.get())))
                .unwrap_or(u64::MAX),
            _ => 0,
        };
        let raw = location.local().and_then(|folder| {
            raw_layout(&array, unit).map(|shard_rows| Raw {
                folder: folder.to_path_buf(),
                shard_rows,
            })
        });
        Ok(ArrayHandle {
            name: name.to_string(),
            root: location.to_string(),
            storage: storage.clone(),
            row_bytes: row_bytes as usize,
            dtype,
            unit_rows: unit,
            shard_cache,
            index_bytes,
            raw,
            array,
        })
    }

    /// True when reads take rows straight from uncompressed chunks.
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
    }

    fn ctx(&self, e: impl std::fmt::Display) -> String {
        format!("{}: array '{}': {e}", self.root, self.name)
    }

    pub fn shape(&self) -> Vec<u64> {
        self.array.shape().to_vec()
    }

    pub fn rows(&self) -> u64 {
        self.array.shape()[0]
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Rows per read unit (inner chunk if sharded).
    pub fn unit_rows(&self) -> u64 {
        self.unit_rows
    }

    /// Chunk shape (inner chunk if sharded), shard shape if sharded, and the codec metadata.
    pub fn layout(&self) -> (Vec<u64>, Option<Vec<u64>>, Value) {
        let zeros = vec![0u64; self.array.dimensionality()];
        let outer: Vec<u64> = self
            .array
            .chunk_shape(&zeros)
            .map(|s| s.iter().map(|d| d.get()).collect())
            .unwrap_or_default();
        let codecs = match self.array.metadata() {
            ArrayMetadata::V3(m) => {
                codecs_json(serde_json::to_value(&m.codecs).unwrap_or(Value::Null))
            }
            ArrayMetadata::V2(_) => Value::Null,
        };
        match self.array.effective_subchunk_shape() {
            Some(inner) if self.array.is_exclusively_sharded() => {
                (inner.iter().map(|d| d.get()).collect(), Some(outer), codecs)
            }
            _ => (outer, None, codecs),
        }
    }

    fn rows_subset(&self, start: u64, stop: u64) -> ArraySubset {
        let ranges: Vec<_> = std::iter::once(start..stop)
            .chain(self.array.shape()[1..].iter().map(|&d| 0..d))
            .collect();
        ArraySubset::new_with_ranges(&ranges)
    }

    fn map_err(&self, e: zarrs::array::ArrayError) -> Error {
        use zarrs::array::ArrayError as E;
        match e {
            E::StorageError(e) => Error::Io(self.ctx(e)),
            e => Error::Corrupt(self.ctx(format!("cannot decode: {e}"))),
        }
    }

    /// Read unit `unit` (`shard` false) or write unit (`shard` true) for messages: its index,
    /// rows and file.
    fn unit_desc(&self, unit: u64, shard: bool) -> String {
        let (per, what) = match shard {
            true => (self.write_unit_rows().max(1), "shard"),
            false => (self.unit_rows.max(1), "chunk"),
        };
        let lo = unit.saturating_mul(per);
        let hi = lo.saturating_add(per).min(self.rows());
        let mut idx = vec![0u64; self.array.dimensionality()];
        idx[0] = lo / self.write_unit_rows().max(1);
        format!(
            "{what} {unit} (rows {lo}..{hi}, file {})",
            self.array.chunk_key(&idx)
        )
    }

    fn chunk_desc(&self, unit: u64) -> String {
        self.unit_desc(unit, false)
    }

    /// `map_err` for a failure to read a read unit (or a write unit, `shard`).
    fn unit_err(&self, unit: u64, shard: bool, e: zarrs::array::ArrayError) -> Error {
        use zarrs::array::ArrayError as E;
        let at = self.unit_desc(unit, shard);
        match e {
            E::StorageError(e) => Error::Io(self.ctx(format!("{at}: {e}"))),
            e => Error::Corrupt(self.ctx(format!("{at}: cannot decode: {e}"))),
        }
    }

    fn chunk_err(&self, unit: u64, e: zarrs::array::ArrayError) -> Error {
        self.unit_err(unit, false, e)
    }

    /// The error of a failed read of rows `start..stop`, naming the first write unit that fails
    /// alone, and the read unit in it that does (`e` as it is when none does).
    fn locate(&self, start: u64, stop: u64, e: zarrs::array::ArrayError) -> Error {
        let read = |lo: u64, hi: u64| {
            let subset = self.rows_subset(lo.max(start), hi.min(stop));
            self.array
                .retrieve_array_subset_opt::<ArrayBytes>(&subset, &CodecOptions::default())
        };
        let (u, w) = (self.unit_rows.max(1), self.write_unit_rows().max(1));
        for shard in start / w..stop.div_ceil(w) {
            let (lo, hi) = (
                shard.saturating_mul(w),
                shard.saturating_add(1).saturating_mul(w),
            );
            let Err(e) = read(lo, hi) else {
                continue;
            };
            for unit in (lo.max(start) / u..hi.min(stop).div_ceil(u)).filter(|_| u < w) {
                if let Err(e) = read(
                    unit.saturating_mul(u),
                    unit.saturating_add(1).saturating_mul(u),
                ) {
                    return self.chunk_err(unit, e);
                }
            }
            return self.unit_err(shard, u < w, e);
        }
        self.map_err(e)
    }

    /// Refuse the inner chunks of rows `lo..hi` whose shard index entry points past the end of
    /// the shard file (zarrs would allocate or slice by it): the index keeps a crc32c, but one
    /// written by another tool, or forged, is not checked further.
    fn check_index(&self, lo: u64, hi: u64) -> Result<()> {
        let Some(cache) = &self.shard_cache else {
            return Ok(());
        };
        let grid = self.array.subchunk_grid_shape();
        if grid[1..].contains(&0) {
            return Ok(());
        }
        let u = self.unit_rows.max(1);
        let shard_rows = self.write_unit_rows().max(1);
        let mut file: Option<(u64, Option<u64>)> = None; // (shard, its bytes if stored)
        for unit in lo / u..hi.div_ceil(u) {
            let shard = unit.saturating_mul(u) / shard_rows;
            let stored = match file {
                Some((s, b)) if s == shard => b,
                _ => {
                    let mut idx = vec![0u64; grid.len()];
                    idx[0] = shard;
                    let size = self.storage.size_key(&self.array.chunk_key(&idx));
                    let b = size.ok().flatten();
                    file = Some((shard, b));
                    b
                }
            };
            // not stored: no index to read (the shard holds the fill value)
            let Some(bytes) = stored else {
                continue;
            };
            self.check_index_fits(unit, bytes)?;
            let mut idx = vec![0u64; grid.len()];
            idx[0] = unit;
            loop {
                let range = self
                    .array
                    .subchunk_byte_range(cache, &idx)
                    .map_err(|e| self.chunk_err(unit, e))?;
                if let Some(r) = range {
                    let (off, len) = (r.start(u64::MAX), r.length(u64::MAX));
                    let missing = off == u64::MAX && len == u64::MAX;
                    if !missing && off.checked_add(len).is_none_or(|end| end > bytes) {
                        return Err(Error::Corrupt(self.ctx(format!(
                            "{}: the shard index points at {len} bytes from byte {off}, past the \
                             end of the shard ({bytes} bytes)",
                            self.chunk_desc(unit)
                        ))));
                    }
                }
                // the next inner chunk of these rows along the other axes
                let Some(d) = (1..idx.len()).rev().find(|&d| idx[d] + 1 < grid[d]) else {
                    break;
                };
                idx[d] += 1;
                idx[d + 1..].fill(0);
            }
        }
        Ok(())
    }

    /// Refuse a shard of `bytes` bytes (that holds read unit `unit`) too short for the index its
    /// metadata implies, before zarrs reads (and allocates) that index.
    fn check_index_fits(&self, unit: u64, bytes: u64) -> Result<()> {
        if bytes < self.index_bytes {
            return Err(Error::Corrupt(self.ctx(format!(
                "{}: the shard has {bytes} bytes, less than its index ({} bytes)",
                self.unit_desc(unit, false),
                self.index_bytes
            ))));
        }
        Ok(())
    }

    fn check_rows(&self, start: u64, n: u64, what: &str) -> Result<()> {
        if start.checked_add(n).is_none_or(|end| end > self.rows()) {
            return Err(Error::Index(self.ctx(format!(
                "{what} rows {start}..{} out of range for {} rows",
                start.saturating_add(n),
                self.rows()
            ))));
        }
        Ok(())
    }

    /// Rows per write unit: the shard if sharded, else the chunk.
    pub fn write_unit_rows(&self) -> u64 {
        let zeros = vec![0u64; self.array.dimensionality()];
        self.array
            .chunk_shape(&zeros)
            .map(|s| s[0].get())
            .unwrap_or(1)
    }

    /// Rows in a block of `len` bytes written at `start`, once checked to be whole rows in range.
    pub fn check_block(&self, start: u64, len: usize) -> Result<u64> {
        let rb = self.row_bytes.max(1);
        if self.row_bytes == 0 || !len.is_multiple_of(rb) {
            return Err(Error::Invalid(self.ctx(format!(
                "{len} bytes are not whole rows of {} bytes",
                self.row_bytes
            ))));
        }
        let n = (len / rb) as u64;
        self.check_rows(start, n, "write of")?;
        Ok(n)
    }

    /// Write whole rows `start..` from `bytes` (C order, native endianness, this array's dtype).
    pub fn write_rows(&self, start: u64, bytes: &[u8]) -> Result<()> {
        let n = self.check_block(start, bytes.len())?;
        if n == 0 {
            return Ok(());
        }
        let subset = self.rows_subset(start, start + n);
        self.array
            .store_array_subset_opt(
                &subset,
                ArrayBytes::new_flen(bytes),
                &CodecOptions::default(),
            )
            .map_err(|e| self.map_err(e))
    }

    /// Decode rows `start..stop` straight into `out` (exactly that many rows), chunks in parallel.
    pub fn read_range_into(&self, start: u64, stop: u64, out: &mut [u8]) -> Result<()> {
        let n = stop.saturating_sub(start);
        self.check_rows(start, n, "read of")?;
        self.check_out(n, out.len())?;
        if n == 0 || out.is_empty() {
            return Ok(());
        }
        let mut out_shape = self.shape();
        out_shape[0] = n;
        let bytes = UnsafeCellSlice::new(out);
        // SAFETY: a single view over the whole buffer, so no other view overlaps it.
        let mut view = unsafe {
            ArrayBytesFixedDisjointView::new(
                bytes,
                self.dtype.size(),
                &out_shape,
                ArraySubset::new_with_shape(out_shape.clone()),
            )
        }
        .map_err(|e| Error::Invalid(self.ctx(e)))?;
        let shard_rows = self.write_unit_rows().max(1);
        self.check_index(
            start / shard_rows * shard_rows,
            stop.div_ceil(shard_rows)
                .saturating_mul(shard_rows)
                .min(self.rows()),
        )?;
        self.array
            .retrieve_array_subset_into_opt(
                &self.rows_subset(start, stop),
                (&mut view).into(),
                &CodecOptions::default(),
            )
            .map_err(|e| self.locate(start, stop, e))
    }

    fn check_out(&self, n: u64, len: usize) -> Result<()> {
        let need = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(self.row_bytes));
        if need != Some(len) {
            return Err(Error::Invalid(self.ctx(format!(
                "output buffer has {len} bytes, not {n} rows of {} bytes",
                self.row_bytes
            ))));
        }
        Ok(())
    }

    /// Gather `rows` (any order, repeats allowed) into `out`: each chunk touched is decoded once,
    /// chunks in parallel, rows copied straight to their output slots.
    pub fn read_rows_into(&self, rows: &[u64], out: &mut [u8]) -> Result<()> {
        self.check_out(rows.len() as u64, out.len())?;
        self.check_row_ids(rows)?;
        if let Some((start, stop)) = gather::as_range(rows) {
            if self.raw.is_none() {
                return self.read_range_into(start, stop, out);
            }
        }
        let rb = self.row_bytes;
        let slots = (0..rows.len()).map(|i| (0, i * rb)).collect();
        let scatter = Scatter::new(vec![out], slots, rb)?;
        self.read_rows_scatter(rows, 0, &scatter)
    }

    fn check_row_ids(&self, rows: &[u64]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows()) {
            return Err(Error::Index(
                self.ctx(format!("row {bad} out of range for {} rows", self.rows())),
            ));
        }
        Ok(())
    }

    /// Gather bytes `col..col + scatter.len` of each of `rows` (any order, repeats allowed) into
    /// the scatter's slot of the same index: each chunk touched is read or decoded once, chunks in
    /// parallel (in the current rayon pool).
    pub fn read_rows_scatter(&self, rows: &[u64], col: usize, scatter: &Scatter) -> Result<()> {
        self.read_rows_scatter_mapped(rows, col, scatter, None)
    }

    /// `read_rows_scatter`, uncompressed chunks read through the maps of `maps` when given.
    pub fn read_rows_scatter_mapped(
        &self,
        rows: &[u64],
        col: usize,
        scatter: &Scatter,
        maps: Option<&FileMaps>,
    ) -> Result<()> {
        let len = scatter.len;
        if rows.len() != scatter.slots.len() || col + len > self.row_bytes {
            return Err(Error::Invalid(self.ctx(format!(
                "{} rows into {} slots of bytes {col}..{} (rows have {})",
                rows.len(),
                scatter.slots.len(),
                col + len,
                self.row_bytes
            ))));
        }
        self.check_row_ids(rows)?;
        if len == 0 || rows.is_empty() {
            return Ok(());
        }
        let groups = gather::plan(rows, self.unit_rows);
        let options = CodecOptions::default().with_concurrent_target(1);
        groups.par_iter().try_for_each(|g| {
            if self.raw.is_some() && self.raw_group(g, col, scatter, maps)? {
                return Ok(());
            }
            let unit = g.lo / self.unit_rows.max(1);
            self.check_index(g.lo, g.hi)?;
            let subset = self.rows_subset(g.lo, g.hi);
            let decoded: ArrayBytes<'static> = match &self.shard_cache {
                Some(cache) => self
                    .array
                    .retrieve_array_subset_sharded_opt(cache, &subset, &options),
                None => self.array.retrieve_array_subset_opt(&subset, &options),
            }
            .map_err(|e| self.chunk_err(unit, e))?;
            let decoded = decoded
                .into_fixed()
                .map_err(|e| Error::Corrupt(self.ctx(format!("{}: {e}", self.chunk_desc(unit)))))?;
            let rb = self.row_bytes;
            for &(row, slot) in &g.picks {
                let src = &decoded[(row - g.lo) as usize * rb + col..][..len];
                // SAFETY: every slot belongs to exactly one pick of one group (`plan`), and the
                // scatter's slots are disjoint and in bounds (`Scatter::new`).
                unsafe { scatter.slot(slot) }.copy_from_slice(src);
            }
            Ok(())
        })
    }

    /// Read the picks of `g` straight from an uncompressed chunk (through its file's map when
    /// `maps` has one). Ok(false): the chunk is not stored (it holds the fill value), the caller
    /// decodes it the ordinary way.
    fn raw_group(
        &self,
        g: &gather::Group,
        col: usize,
        scatter: &Scatter,
        maps: Option<&FileMaps>,
    ) -> Result<bool> {
        let raw = self.raw.as_ref().expect("raw array");
        let unit = g.lo / self.unit_rows;
        let rb = self.row_bytes as u64;
        let chunk_bytes = self.unit_rows * rb;
        let mut idx = vec![0u64; self.array.dimensionality()];
        idx[0] = raw.shard_rows.map_or(unit, |s| g.lo / s);
        let path = raw.folder.join(self.array.chunk_key(&idx).as_str());
        let io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt(self.ctx(format!("{}: truncated chunk", path.display())))
            } else {
                Error::Io(self.ctx(format!("{}: {e}", path.display())))
            }
        };
        // The file, mapped or opened; not stored: the chunk holds the fill value.
        let (map, file) = match maps.map(|m| m.get(&path)).transpose().map_err(io)? {
            Some(Mapped::Missing) => return Ok(false),
            Some(Mapped::Map(map)) => (Some(map), None),
            Some(Mapped::Unmapped) | None => match std::fs::File::open(&path) {
                Ok(f) => (None, Some(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io(e)),
            },
        };
        let size = match (&map, &file) {
            (Some(map), _) => map.len() as u64,
            (_, Some(file)) => file.metadata().map_err(io)?.len(),
            _ => unreachable!("a map or a file"),
        };
        let base = match &self.shard_cache {
            Some(cache) if raw.shard_rows.is_some() => {
                self.check_index_fits(unit, size)?;
                idx[0] = unit;
                let range = self
                    .array
                    .subchunk_byte_range(cache, &idx)
                    .map_err(|e| self.chunk_err(unit, e))?;
                // An inner chunk that is not stored has no range (or offset = length = u64::MAX).
                let Some(range) = range.filter(|r| r.length(u64::MAX) != u64::MAX) else {
                    return Ok(false);
                };
                if range.length(u64::MAX) != chunk_bytes {
                    return Err(Error::Corrupt(self.ctx(format!(
                        "inner chunk {unit} has {} bytes, expected {chunk_bytes}",
                        range.length(u64::MAX)
                    ))));
                }
                range.start(u64::MAX)
            }
            _ => 0,
        };
        let len = scatter.len;
        let first = unit * self.unit_rows;
        // u64::MAX: an offset from a forged shard index that no file reaches
        let end = base.saturating_add(chunk_bytes);
        if size < end || (raw.shard_rows.is_none() && size != chunk_bytes) {
            return Err(Error::Corrupt(self.ctx(format!(
                "{}: truncated: its file has {size} bytes, the chunk needs {end}",
                self.chunk_desc(unit),
            ))));
        }
        if let Some(map) = map {
            for &(row, slot) in &g.picks {
                let at = (base + (row - first) * rb) as usize + col;
                // SAFETY: as in `read_rows_scatter`.
                unsafe { scatter.slot(slot) }.copy_from_slice(&map[at..at + len]);
            }
            return Ok(true);
        }
        let file = file.expect("no map: a file");
        if len >= RAW_ROW_READ_BYTES || g.picks.len() == 1 {
            for &(row, slot) in &g.picks {
                let at = base + (row - first) * rb + col as u64;
                // SAFETY: as in `read_rows_scatter`.
                file.read_exact_at(unsafe { scatter.slot(slot) }, at)
                    .map_err(io)?;
            }
        } else {
            let mut span = vec![0u8; ((g.hi - g.lo) * rb) as usize];
            file.read_exact_at(&mut span, base + (g.lo - first) * rb)
                .map_err(io)?;
            for &(row, slot) in &g.picks {
                let src = &span[((row - g.lo) * rb) as usize + col..][..len];
                // SAFETY: as in `read_rows_scatter`.
                unsafe { scatter.slot(slot) }.copy_from_slice(src);
            }
        }
        Ok(true)
    }
}

/// Rows of at least this many bytes are read one `pread` each; smaller ones in one span per chunk.
const RAW_ROW_READ_BYTES: usize = 16 << 10;

/// At most this many files are kept mapped by one `FileMaps`; past it the cache starts afresh
/// (maps in use stay alive until their reads end). Keeps well under `vm.max_map_count`.
pub const MAX_FILE_MAPS: usize = 4096;

/// Read-only memory maps of the chunk and shard files of uncompressed arrays, kept by one reader
/// (a stream) for its lifetime: rows are then copied with a user-space `memcpy` straight out of
/// the page cache, without a system call and a kernel copy per row, and the pages mapped in one
/// epoch stay mapped for the next.
///
/// A file is mapped whole, once. Before any byte of it is read, the length it had when mapped is
/// checked against the bytes the read needs (the chunk size, or the inner chunk's range in the
/// shard index), so a file that was already truncated gives the usual corrupt-store error naming
/// the array, never a SIGBUS. Out of scope: a file truncated in place *while* it is mapped (by
/// another process rewriting the store under a running reader); touching its lost pages raises
/// SIGBUS, as with any mapped file. A file deleted or replaced by a new file (a store overwritten)
/// is harmless: the map keeps the old contents. A file that cannot be mapped is read with `pread`.
#[derive(Default)]
pub struct FileMaps {
    /// None: the file could not be mapped (read it with `pread`).
    maps: Mutex<HashMap<PathBuf, Option<Arc<Mmap>>>>,
}

enum Mapped {
    Map(Arc<Mmap>),
    /// The file does not exist (the chunk holds the fill value).
    Missing,
    /// Read the file with `pread`.
    Unmapped,
}

impl FileMaps {
    fn get(&self, path: &Path) -> std::io::Result<Mapped> {
        let found = |m: &Option<Arc<Mmap>>| m.clone().map_or(Mapped::Unmapped, Mapped::Map);
        if let Some(m) = self.maps.lock().unwrap().get(path) {
            return Ok(found(m));
        }
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Mapped::Missing),
            Err(e) => return Err(e),
        };
        // SAFETY: the map is read-only and private to this reader; reads stay within the length
        // the file had when mapped (checked by the caller). A file shrunk while mapped is out of
        // scope (see the type's docs).
        let map = unsafe { Mmap::map(&file) }.ok().map(Arc::new);
        let mut maps = self.maps.lock().unwrap();
        if maps.len() >= MAX_FILE_MAPS {
            maps.clear();
        }
        // Another thread may have mapped it meanwhile: keep one.
        Ok(found(maps.entry(path.to_path_buf()).or_insert(map)))
    }

    /// Files mapped (or found unmappable) so far.
    pub fn len(&self) -> usize {
        self.maps.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Output slots of a gather: slot i is `len` bytes at `slots[i] = (piece, byte offset)`.
/// Slots are checked disjoint and in bounds, so gathers may fill them from several threads.
pub struct Scatter<'a> {
    pieces: Vec<UnsafeCellSlice<'a, u8>>,
    slots: Vec<(usize, usize)>,
    len: usize,
}

impl<'a> Scatter<'a> {
    pub fn new(pieces: Vec<&'a mut [u8]>, slots: Vec<(usize, usize)>, len: usize) -> Result<Self> {
        let mut sorted = slots.clone();
        sorted.sort_unstable();
        let bad = sorted.iter().any(|&(p, off)| {
            pieces
                .get(p)
                .is_none_or(|piece| off.checked_add(len).is_none_or(|end| end > piece.len()))
        }) || (len > 0
            && sorted
                .windows(2)
                .any(|w| w[0].0 == w[1].0 && w[0].1 + len > w[1].1));
        if bad {
            return Err(Error::Invalid(format!(
                "output slots of {len} bytes overlap or fall outside their buffers"
            )));
        }
        Ok(Scatter {
            pieces: pieces.into_iter().map(UnsafeCellSlice::new).collect(),
            slots,
            len,
        })
    }

    /// # Safety
    /// No other reference to slot `i` may be alive (slots are disjoint, so distinct `i` are fine).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, i: usize) -> &mut [u8] {
        let (p, off) = self.slots[i];
        self.pieces[p].index_mut(off..off + self.len)
    }
}

/// Codec metadata as JSON, every codec spelled `{"name": ..., "configuration"?: ...}` (Zarr v3 also
/// allows a bare name, which other writers use for codecs without configuration), nested chains of
/// sharding included.
fn codecs_json(codecs: Value) -> Value {
    fn norm(v: Value) -> Value {
        match v {
            Value::Array(cs) => Value::Array(cs.into_iter().map(norm_codec).collect()),
            v => v,
        }
    }
    fn norm_codec(c: Value) -> Value {
        match c {
            Value::String(name) => json!({ "name": name }),
            Value::Object(mut o) => {
                if let Some(Value::Object(cfg)) = o.get_mut("configuration") {
                    for key in ["codecs", "index_codecs"] {
                        if let Some(v) = cfg.remove(key) {
                            cfg.insert(key.into(), norm(v));
                        }
                    }
                }
                Value::Object(o)
            }
            c => c,
        }
    }
    norm(codecs)
}

/// Whether `array` is read by `raw_group`: the `bytes` codec alone (little-endian, on a
/// little-endian host), regular grids, rows contiguous in chunks. Some(shard rows if sharded).
fn raw_layout(array: &Array<Storage>, unit_rows: u64) -> Option<Option<u64>> {
    let ArrayMetadata::V3(m) = array.metadata() else {
        return None;
    };
    let meta = serde_json::to_value(m).ok()?;
    let codecs = codecs_json(serde_json::to_value(&m.codecs).unwrap_or(Value::Null));
    let regular = meta["chunk_grid"]["name"] == "regular";
    let no_transformers = meta
        .get("storage_transformers")
        .and_then(Value::as_array)
        .is_none_or(|t| t.is_empty());
    if !regular || !no_transformers || unit_rows == 0 {
        return None;
    }
    let plain_bytes = |codecs: &Value| -> bool {
        let Some([c]) = codecs.as_array().map(Vec::as_slice) else {
            return false;
        };
        let endian = c["configuration"]["endian"].as_str();
        c["name"] == "bytes"
            && (endian.is_none() || (endian == Some("little") && cfg!(target_endian = "little")))
    };
    let shape = array.shape();
    let zeros = vec![0u64; shape.len()];
    let grid: Vec<u64> = array
        .chunk_shape(&zeros)
        .ok()?
        .iter()
        .map(|d| d.get())
        .collect();
    let spans_rows = |chunk: &[u64]| chunk.len() == shape.len() && chunk[1..] == shape[1..];
    if shape[1..].contains(&0) || !spans_rows(&grid) {
        return None;
    }
    let codecs = &codecs;
    if plain_bytes(codecs) {
        return Some(None);
    }
    let [sharding] = codecs.as_array()?.as_slice() else {
        return None;
    };
    let inner: Vec<u64> = array
        .effective_subchunk_shape()?
        .iter()
        .map(|d| d.get())
        .collect();
    (sharding["name"] == "sharding_indexed"
        && array.is_exclusively_sharded()
        && plain_bytes(&sharding["configuration"]["codecs"])
        && spans_rows(&inner)
        && inner[0] == unit_rows)
        .then_some(Some(grid[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: Vec<u64>, chunk_rows: u64, shard_rows: Option<u64>) -> ArraySpec {
        ArraySpec {
            shape,
            dtype: DType::Int32,
            chunk_rows,
            shard_rows,
            compression: Compression::Zstd(3),
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n as i32).flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn write_read_gather_sharded_and_not() {
        for shard in [None, Some(8)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.zarr");
            let s = Store::create(&path, Map::new(), false).unwrap();
            let h = s.create_array("x", &spec(vec![21, 3], 4, shard)).unwrap();
            let bytes = data(21 * 3);
            h.write_rows(0, &bytes[..10 * 12]).unwrap();
            h.write_rows(10, &bytes[10 * 12..]).unwrap();
            s.finalize().unwrap();

            let s = Store::open(&path, true).unwrap();
            assert_eq!(s.array_names().unwrap(), vec!["x"]);
            let h = s.array("x").unwrap();
            let mut out = vec![0u8; 21 * 12];
            h.read_range_into(0, 21, &mut out).unwrap();
            assert_eq!(out, bytes);
            let rows = [20u64, 0, 5, 5, 13, 2];
            let mut out = vec![0u8; rows.len() * 12];
            h.read_rows_into(&rows, &mut out).unwrap();
            for (i, &r) in rows.iter().enumerate() {
                assert_eq!(out[i * 12..][..12], bytes[r as usize * 12..][..12]);
            }
            assert!(matches!(
                h.read_rows_into(&[21], &mut [0u8; 12]),
                Err(Error::Index(_))
            ));
        }
    }

    #[test]
    fn uncompressed_rows_are_read_straight_from_the_files() {
        for (shard, cols) in [(None, 3), (Some(8), 3), (None, 5000), (Some(8), 5000)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.zarr");
            let s = Store::create(&path, Map::new(), false).unwrap();
            let mut sp = spec(vec![21, cols], 4, shard);
            sp.compression = Compression::None;
            let h = s.create_array("x", &sp).unwrap();
            assert!(h.is_raw());
            let rb = cols as usize * 4;
            let bytes = data(21 * cols as usize);
            h.write_rows(0, &bytes[..8 * rb]).unwrap(); // rows 8..12 stay unwritten (zeros)
            h.write_rows(12, &bytes[12 * rb..]).unwrap();
            s.finalize().unwrap();
            let h = Store::open(&path, true).unwrap().array("x").unwrap();
            assert!(h.is_raw());
            let rows = [20u64, 0, 5, 5, 13, 2, 9, 3];
            let mut out = vec![0u8; rows.len() * rb];
            h.read_rows_into(&rows, &mut out).unwrap();
            for (i, &r) in rows.iter().enumerate() {
                let want = if (8..12).contains(&r) {
                    vec![0u8; rb]
                } else {
                    bytes[r as usize * rb..][..rb].to_vec()
                };
                assert_eq!(out[i * rb..][..rb], want[..], "row {r}");
            }
            // a column range of each row, scattered over two buffers
            let (mut a, mut b) = (vec![0u8; 8], vec![0u8; 8]);
            let sc = Scatter::new(vec![&mut a, &mut b], vec![(1, 0), (0, 0)], 8).unwrap();
            h.read_rows_scatter(&[1, 14], 4, &sc).unwrap();
            assert_eq!(b, bytes[rb + 4..rb + 12]);
            assert_eq!(a, bytes[14 * rb + 4..14 * rb + 12]);
        }
    }

    #[test]
    fn mapped_reads_match_and_refuse_a_short_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let mut sp = spec(vec![16, 3], 4, Some(8));
        sp.compression = Compression::None;
        let h = s.create_array("x", &sp).unwrap();
        let bytes = data(16 * 3);
        h.write_rows(0, &bytes).unwrap();
        s.finalize().unwrap();
        // shard 1 (rows 8..16) cut in the middle, its index kept: inner chunk 3 lies past the end
        let shard = path.join("x/c/1/0");
        let full = std::fs::read(&shard).unwrap();
        let index = 2 * 16 + 4;
        let cut = [&full[..48], &full[full.len() - index..]].concat();
        std::fs::write(&shard, cut).unwrap();
        let h = Store::open(&path, true).unwrap().array("x").unwrap();
        let maps = FileMaps::default();
        let read = |rows: &[u64]| {
            let mut out = vec![0u8; rows.len() * 12];
            let slots = (0..rows.len()).map(|i| (0, i * 12)).collect();
            let sc = Scatter::new(vec![&mut out], slots, 12).unwrap();
            h.read_rows_scatter_mapped(rows, 0, &sc, Some(&maps))
                .map(|_| out)
        };
        let rows = [9u64, 0, 7, 11, 2];
        let out = read(&rows).unwrap();
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(out[i * 12..][..12], bytes[r as usize * 12..][..12]);
        }
        assert_eq!(maps.len(), 2);
        let err = read(&[13]).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("array 'x'") && err.to_string().contains("chunk 3"));
    }

    #[test]
    fn scatter_refuses_overlapping_slots() {
        let mut a = vec![0u8; 16];
        assert!(Scatter::new(vec![&mut a], vec![(0, 0), (0, 4)], 8).is_err());
        let mut a = vec![0u8; 16];
        assert!(Scatter::new(vec![&mut a], vec![(0, 12)], 8).is_err());
        let mut a = vec![0u8; 16];
        assert!(Scatter::new(vec![&mut a], vec![(0, 8), (0, 0)], 8).is_ok());
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

    #[test]
    fn truncated_chunk_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let h = s.create_array("x", &spec(vec![8, 3], 8, None)).unwrap();
        h.write_rows(0, &data(24)).unwrap();
        s.finalize().unwrap();
        let chunk = path.join("x/c/0/0");
        let len = std::fs::metadata(&chunk).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&chunk)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let h = Store::open(&path, true).unwrap().array("x").unwrap();
        let err = h.read_range_into(0, 8, &mut [0u8; 96]).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("array 'x'"));
    }
}
