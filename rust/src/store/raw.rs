//! Direct reads of uncompressed arrays in a local folder, or in the local disk cache of a remote
//! store (each chunk or shard file downloaded whole before its first read).
//!
//! Reads of an uncompressed array whose rows lie contiguously in its chunks (every dbcore array:
//! chunks span all axes but the first) skip the codec pipeline: each row is read from its chunk
//! (or inner chunk of a shard, located through the cached shard index) straight into its output
//! slot with one `pread`, or, for a reader that keeps `FileMaps` (a stream), with a user-space
//! `memcpy` out of a read-only map of the file. Uncompressed chunks carry no checksum (a shard's
//! index keeps its crc32c): a truncated chunk or shard is detected, a flipped bit inside one is not.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use serde_json::Value;
use zarrs::array::{Array, ArrayMetadata, ArrayShardedExt, ArrayShardedReadableExt};

use super::array::{codecs_json, ArrayHandle};
use super::scatter::Scatter;
use super::Storage;
use crate::error::{Error, Result};
use crate::gather;
use crate::location::Location;
use crate::remote::CachedStorage;

/// Direct access to the rows of an uncompressed array (see the module docs).
pub(super) struct Raw {
    /// Where the chunk and shard files are: the store's folder, or the disk cache.
    files: Files,
    /// Rows per shard (the grid's chunk) when sharded, else None.
    shard_rows: Option<u64>,
}

impl Raw {
    /// Direct access to the rows of `array` (read units of `unit_rows`) stored at `location`:
    /// None unless the store is a local folder (or read through the disk cache) and `raw_layout`
    /// allows it.
    pub(super) fn new(
        location: &Location,
        cached: Option<&CachedStorage>,
        array: &Array<Storage>,
        unit_rows: u64,
    ) -> Option<Raw> {
        let files = match (location.local(), cached) {
            (Some(folder), _) => Files::Folder(folder.to_path_buf()),
            (None, Some(cached)) => Files::Cached(cached.clone()),
            (None, None) => return None,
        };
        raw_layout(array, unit_rows).map(|shard_rows| Raw { files, shard_rows })
    }
}

/// Where the files of a store are.
enum Files {
    Folder(PathBuf),
    Cached(CachedStorage),
}

impl ArrayHandle {
    /// Read the picks of `g` straight from an uncompressed chunk (through its file's map when
    /// `maps` has one). Ok(false): the chunk is not stored (it holds the fill value), the caller
    /// decodes it the ordinary way.
    pub(super) fn raw_group(
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
        let key = self.array.chunk_key(&idx);
        let Some((path, map, file)) = self.open_file(&raw.files, key.as_str(), maps)? else {
            return Ok(false);
        };
        let io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt(self.ctx(format!("{}: truncated chunk", path.display())))
            } else {
                Error::Io(self.ctx(format!("{}: {e}", path.display())))
            }
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

/// A chunk or shard file, mapped or opened.
type Found = (Option<Arc<Mmap>>, Option<std::fs::File>);
type Opened = (PathBuf, Option<Arc<Mmap>>, Option<std::fs::File>);

impl ArrayHandle {
    /// The chunk or shard file of `key`, mapped (through `maps`) or opened; None when it is not
    /// stored (the chunk holds the fill value). A cached file that vanished was evicted by another
    /// process: downloaded again (`CachedStorage::with_file`), never taken for the fill value.
    fn open_file(
        &self,
        files: &Files,
        key: &str,
        maps: Option<&FileMaps>,
    ) -> Result<Option<Opened>> {
        // Some((map, file)), or None when the file is not there.
        let open = |path: &Path| -> Result<Option<Found>> {
            let io = |e: std::io::Error| Error::Io(self.ctx(format!("{}: {e}", path.display())));
            Ok(match maps.map(|m| m.get(path)).transpose().map_err(io)? {
                Some(Mapped::Map(map)) => Some((Some(map), None)),
                Some(Mapped::Missing) => None,
                Some(Mapped::Unmapped) | None => match std::fs::File::open(path) {
                    Ok(f) => Some((None, Some(f))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io(e)),
                },
            })
        };
        let opened = match files {
            Files::Folder(folder) => {
                let path = folder.join(key);
                open(&path)?.map(|found| (path, found))
            }
            Files::Cached(cached) => cached.with_file(key, || self.ctx(key), open)?,
        };
        Ok(opened.map(|(path, (map, file))| (path, map, file)))
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
    use crate::store::tests::{data, spec};
    use crate::store::{Compression, Store};
    use serde_json::Map;

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
}
