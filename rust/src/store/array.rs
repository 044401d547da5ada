//! An open array (`ArrayHandle`): its shape and layout, and its reads and writes of whole rows,
//! chunks in parallel; how a new one is laid out (`ArraySpec`, `Compression`).
//!
//! Sizes from metadata or a shard index are checked before anything is allocated or sliced by
//! them; a failed read names the array and the chunk (its index, rows and file).

use rayon::prelude::*;
use serde_json::{json, Value};
use unsafe_cell_slice::UnsafeCellSlice;
use zarrs::array::{
    Array, ArrayBytes, ArrayBytesFixedDisjointView, ArrayMetadata, ArrayShardedExt,
    ArrayShardedReadableExt, ArrayShardedReadableExtCache, ArraySubset, CodecOptions,
};
use zarrs::storage::ReadableWritableListableStorage;

use super::raw::{FileMaps, Raw};
use super::scatter::Scatter;
use super::Storage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gather;
use crate::location::Location;
use crate::remote::CachedStorage;

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
    pub(super) array: Array<Storage>,
    dtype: DType,
    pub(super) row_bytes: usize,
    /// Rows per read unit: the inner chunk when sharded, else the chunk.
    pub(super) unit_rows: u64,
    pub(super) shard_cache: Option<ArrayShardedReadableExtCache>,
    /// Bytes of a shard's index at least (16 per inner chunk; u64::MAX past 64 bits), 0 unsharded.
    index_bytes: u64,
    /// Set when chunks hold raw rows that reads may take straight from the files.
    pub(super) raw: Option<Raw>,
    /// Set when the store is remote and read through the disk cache.
    cached: Option<CachedStorage>,
    /// Rows per object (a shard, or a chunk when unsharded).
    object_rows: u64,
}

impl ArrayHandle {
    pub(super) fn new(
        name: &str,
        array: Array<Storage>,
        location: &Location,
        storage: &ReadableWritableListableStorage,
        cached: Option<&CachedStorage>,
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
        let raw = Raw::new(location, cached, &array, unit);
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
            cached: cached.cloned(),
            object_rows: chunk[0].get(),
            array,
        })
    }

    /// Rows per object (a shard, or a chunk when unsharded).
    pub fn object_rows(&self) -> u64 {
        self.object_rows
    }

    /// For a remote store read through the disk cache: the array's stored bytes and the cache's
    /// limit.
    pub fn cache_fit(&self) -> Option<(u64, u64)> {
        let cached = self.cached.as_ref()?;
        Some((
            cached.stored_bytes(&format!("{}/", self.name)),
            cached.limit(),
        ))
    }

    /// Start downloading the objects (shards or chunks) that hold `rows` into the disk cache, when
    /// the store is remote; returns at once.
    pub fn prefetch_rows(&self, rows: impl IntoIterator<Item = u64>) {
        let Some(cached) = &self.cached else {
            return;
        };
        let per = self.object_rows.max(1);
        let mut wanted = vec![false; self.rows().div_ceil(per) as usize];
        for r in rows {
            if let Some(w) = wanted.get_mut((r / per) as usize) {
                *w = true;
            }
        }
        let mut idx = vec![0u64; self.array.dimensionality()];
        let keys: Vec<String> = (wanted.iter().enumerate())
            .filter(|(_, &w)| w)
            .map(|(o, _)| {
                idx[0] = o as u64;
                self.array.chunk_key(&idx).to_string()
            })
            .collect();
        cached.prefetch(keys.iter().map(String::as_str));
    }

    /// True when reads take rows straight from uncompressed chunks.
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
    }

    pub(super) fn ctx(&self, e: impl std::fmt::Display) -> String {
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

    pub(super) fn chunk_desc(&self, unit: u64) -> String {
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

    pub(super) fn chunk_err(&self, unit: u64, e: zarrs::array::ArrayError) -> Error {
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
    pub(super) fn check_index_fits(&self, unit: u64, bytes: u64) -> Result<()> {
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
}

impl ArrayHandle {
    /// Gather windows of `len` rows, window i starting at row `starts[i]` (any order, overlaps
    /// allowed), into the scatter's slot i: the windows that start in one read unit are read as
    /// one range (that unit and the rows after it that they reach), units in parallel (in the
    /// current rayon pool). Memory: the ranges being read, never a pick per row.
    pub fn read_windows_scatter(&self, starts: &[u64], len: u64, scatter: &Scatter) -> Result<()> {
        let rb = self.row_bytes;
        if starts.len() != scatter.slots.len() || scatter.len != len as usize * rb {
            return Err(Error::Invalid(self.ctx(format!(
                "{} windows of {len} rows into {} slots of {} bytes",
                starts.len(),
                scatter.slots.len(),
                scatter.len
            ))));
        }
        if let Some(&bad) = starts
            .iter()
            .find(|&&s| s.saturating_add(len) > self.rows())
        {
            return Err(Error::Index(self.ctx(format!(
                "window {bad}..{} out of range for {} rows",
                bad.saturating_add(len),
                self.rows()
            ))));
        }
        let mut order: Vec<(u64, usize)> = starts.iter().copied().zip(0..).collect();
        order.sort_unstable();
        let unit = self.unit_rows.max(1);
        let groups: Vec<&[(u64, usize)]> =
            order.chunk_by(|a, b| a.0 / unit == b.0 / unit).collect();
        groups.par_iter().try_for_each(|g| {
            let (lo, hi) = (g[0].0, g[g.len() - 1].0 + len);
            let mut bytes = vec![0u8; (hi - lo) as usize * rb];
            self.read_range_into(lo, hi, &mut bytes)?;
            for &(start, slot) in g.iter() {
                let src = &bytes[(start - lo) as usize * rb..][..scatter.len];
                // SAFETY: every slot index occurs once in `order`, so in one group, and the
                // scatter's slots are disjoint and in bounds (`Scatter::new`).
                unsafe { scatter.slot(slot) }.copy_from_slice(src);
            }
            Ok(())
        })
    }
}

/// Codec metadata as JSON, every codec spelled `{"name": ..., "configuration"?: ...}` (Zarr v3 also
/// allows a bare name, which other writers use for codecs without configuration), nested chains of
/// sharding included.
pub(super) fn codecs_json(codecs: Value) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{data, spec};
    use crate::store::Store;
    use serde_json::Map;

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
