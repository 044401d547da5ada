//! `dbcore._native`: the pyo3 bindings. Thin: argument checks, buffer access, GIL release.
//!
//! Errors surface as `NativeError(kind, message)`; `dbcore.store` maps `kind` to its exceptions.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde_json::{json, Map, Value};

use crate::dtype::DType;
use crate::error::Error;
use crate::layout;
use crate::location::{Location, S3_SCHEME};
use crate::store::{ArrayHandle, ArraySpec, Compression, Store, FORMAT_VERSION};
use crate::writer::RowWriter;
use crate::{decode, philox, remote, stream};

create_exception!(_native, NativeError, PyException);

fn to_py(e: Error) -> PyErr {
    NativeError::new_err((e.kind(), e.to_string()))
}

fn invalid(msg: String) -> PyErr {
    to_py(Error::Invalid(msg))
}

fn parse_attrs(attrs_json: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str(attrs_json) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(invalid(format!(
            "attributes must be a JSON object, got {attrs_json}"
        ))),
    }
}

/// Pointer and byte length of a C-contiguous array of `dtype` (checked writable if asked).
fn array_raw(
    arr: &Bound<'_, PyUntypedArray>,
    dtype: DType,
    writable: bool,
) -> PyResult<(*mut u8, usize)> {
    if !arr.is_c_contiguous() {
        return Err(invalid("array must be C-contiguous".into()));
    }
    let descr = arr.dtype();
    if descr.itemsize() != dtype.size() || !descr.is_native_byteorder().unwrap_or(true) {
        return Err(to_py(Error::DType(format!(
            "buffer of itemsize {} does not hold {}",
            descr.itemsize(),
            dtype.name()
        ))));
    }
    // SAFETY: `arr` is a live NumPy array, so its object header is valid to read.
    let raw = unsafe { &*arr.as_array_ptr() };
    if writable && raw.fields.flags & numpy::npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(invalid("output array is read-only".into()));
    }
    Ok((raw.fields.data as *mut u8, arr.len() * dtype.size()))
}

// SAFETY (both helpers): a C-contiguous array holds `len` bytes at `ptr`, alive as long as `arr`
// is borrowed. Another Python thread could write to it while the GIL is released: as with any
// NumPy buffer shared between threads, that is the caller's race.
fn array_ref<'a>(arr: &'a Bound<'_, PyUntypedArray>, dtype: DType) -> PyResult<&'a [u8]> {
    let (ptr, len) = array_raw(arr, dtype, false)?;
    Ok(if len == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(ptr, len) }
    })
}

#[allow(clippy::mut_from_ref)] // the buffer belongs to the NumPy array, not to the borrow
fn array_mut<'a>(arr: &'a Bound<'_, PyUntypedArray>, dtype: DType) -> PyResult<&'a mut [u8]> {
    let (ptr, len) = array_raw(arr, dtype, true)?;
    Ok(if len == 0 {
        &mut []
    } else {
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    })
}

/// A store opened or created by `dbcore.store`.
#[pyclass(frozen, module = "dbcore._native")]
struct NativeStore {
    inner: Arc<Store>,
}

impl NativeStore {
    /// The open array `name`; opening reads its metadata (over the network for an s3:// store),
    /// so the GIL is released (a local S3 server may be Python code in this process).
    fn handle(&self, py: Python<'_>, name: &str) -> PyResult<Arc<ArrayHandle>> {
        py.detach(|| self.inner.array(name)).map_err(to_py)
    }
}

/// A local path, or an `s3://bucket/prefix` URL.
fn location(path: PathBuf) -> PyResult<Location> {
    match path.to_str() {
        Some(text) if text.starts_with(S3_SCHEME) => Location::parse(text).map_err(to_py),
        _ => Ok(Location::Local(path)),
    }
}

#[pymethods]
impl NativeStore {
    #[staticmethod]
    fn create(py: Python<'_>, path: PathBuf, attrs_json: &str, overwrite: bool) -> PyResult<Self> {
        let attrs = parse_attrs(attrs_json)?;
        let location = location(path)?;
        let store = py
            .detach(|| Store::create(location, attrs, overwrite))
            .map_err(to_py)?;
        Ok(NativeStore {
            inner: Arc::new(store),
        })
    }

    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf, require_complete: bool) -> PyResult<Self> {
        let location = location(path)?;
        let store = py
            .detach(|| Store::open(location, require_complete))
            .map_err(to_py)?;
        Ok(NativeStore {
            inner: Arc::new(store),
        })
    }

    /// Whether `path` holds a Zarr group.
    #[staticmethod]
    fn exists(py: Python<'_>, path: PathBuf) -> PyResult<bool> {
        let location = location(path)?;
        py.detach(|| Store::exists(location)).map_err(to_py)
    }

    /// The store's path, or its s3:// URL.
    #[getter]
    fn path(&self) -> String {
        self.inner.root().to_string()
    }

    /// The bytes of a file of the group that is no array, or None.
    fn get_bytes<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let got = py.detach(|| self.inner.get_bytes(name)).map_err(to_py)?;
        Ok(got.map(|b| PyBytes::new(py, &b)))
    }

    /// Write (replace) a file of the group that is no array.
    fn set_bytes(&self, py: Python<'_>, name: &str, data: &[u8]) -> PyResult<()> {
        py.detach(|| self.inner.set_bytes(name, data))
            .map_err(to_py)
    }

    /// Delete a file of the group that is no array (none: no error).
    fn erase(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        py.detach(|| self.inner.erase(name)).map_err(to_py)
    }

    /// Bytes stored for array `name`.
    fn stored_bytes(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        py.detach(|| self.inner.stored_bytes(name)).map_err(to_py)
    }

    /// All group attributes (the `dbcore` key included), as JSON.
    fn attrs_json(&self) -> String {
        Value::Object(self.inner.attrs()).to_string()
    }

    fn array_names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        py.detach(|| self.inner.array_names()).map_err(to_py)
    }

    /// Shape, dtype, chunk and shard shapes and codecs of one array, as JSON.
    fn array_info_json(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        let h = self.handle(py, name)?;
        let (chunks, shards, codecs) = h.layout();
        Ok(json!({
            "shape": h.shape(),
            "dtype": h.dtype().name(),
            "chunks": chunks,
            "shards": shards,
            "codecs": codecs,
        })
        .to_string())
    }

    /// `compression`: "zstd" (at `level`) or "none" (the bytes codec alone, no checksum).
    #[pyo3(signature = (name, shape, dtype, chunk_rows=None, shard_rows=None, compression="zstd",
        level=3))]
    #[allow(clippy::too_many_arguments)]
    fn create_array(
        &self,
        py: Python<'_>,
        name: &str,
        shape: Vec<u64>,
        dtype: &str,
        chunk_rows: Option<u64>,
        shard_rows: Option<i64>,
        compression: &str,
        level: i32,
    ) -> PyResult<()> {
        let compression = Compression::from_name(compression, level).map_err(to_py)?;
        let dtype = DType::from_name(dtype).map_err(to_py)?;
        let rows = shape.first().copied().unwrap_or(0);
        let row_bytes = shape.iter().skip(1).product::<u64>() * dtype.size() as u64;
        let chunk_rows = chunk_rows.unwrap_or_else(|| layout::default_chunk_rows(rows, row_bytes));
        // shard_rows: None = automatic, 0 = no sharding, n = n rows per shard.
        let shard_rows = match shard_rows {
            None => layout::default_shard_rows(rows, row_bytes, chunk_rows),
            Some(0) => None,
            Some(n) if n > 0 => Some(n as u64),
            Some(n) => return Err(invalid(format!("shard_rows must be >= 0, got {n}"))),
        };
        let spec = ArraySpec {
            shape,
            dtype,
            chunk_rows,
            shard_rows,
            compression,
        };
        py.detach(|| self.inner.create_array(name, &spec))
            .map_err(to_py)?;
        Ok(())
    }

    /// Write `block` (C-contiguous, the array's dtype) as rows `start..start+len(block)`.
    fn write_rows(
        &self,
        py: Python<'_>,
        name: &str,
        start: u64,
        block: &Bound<'_, PyUntypedArray>,
    ) -> PyResult<()> {
        let h = self.handle(py, name)?;
        let bytes = array_ref(block, h.dtype())?;
        py.detach(|| h.write_rows(start, bytes)).map_err(to_py)
    }

    /// Decode rows `start..stop` into `out` (C-contiguous, writable, exactly that many rows).
    fn read_range_into(
        &self,
        py: Python<'_>,
        name: &str,
        start: u64,
        stop: u64,
        out: &Bound<'_, PyUntypedArray>,
    ) -> PyResult<()> {
        let h = self.handle(py, name)?;
        let buf = array_mut(out, h.dtype())?;
        py.detach(|| h.read_range_into(start, stop, buf))
            .map_err(to_py)
    }

    /// Gather `rows` (uint64, any order) into `out` (C-contiguous, writable, len(rows) rows).
    fn read_rows_into(
        &self,
        py: Python<'_>,
        name: &str,
        rows: &Bound<'_, PyUntypedArray>,
        out: &Bound<'_, PyUntypedArray>,
    ) -> PyResult<()> {
        let h = self.handle(py, name)?;
        let rows = array_ref(rows, DType::UInt64)?;
        let rows: Vec<u64> = rows
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        let buf = array_mut(out, h.dtype())?;
        py.detach(|| h.read_rows_into(&rows, buf)).map_err(to_py)
    }

    /// A buffering writer for array `name` (see rust/src/writer.rs).
    fn writer(&self, py: Python<'_>, name: &str) -> PyResult<NativeWriter> {
        Ok(NativeWriter {
            inner: RowWriter::new(self.handle(py, name)?),
        })
    }

    fn finalize(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.finalize()).map_err(to_py)
    }
}

/// The store a `NativeStream` reads: an open `NativeStore`, streamed as it was opened (complete
/// or not, as its opener required; the group is not opened again, its open arrays are shared), or
/// the path or s3:// URL of a store to open (a complete one).
#[derive(FromPyObject)]
enum StoreArg<'py> {
    #[pyo3(annotation = "NativeStore")]
    Store(Bound<'py, NativeStore>),
    #[pyo3(annotation = "str | os.PathLike")]
    Path(PathBuf),
}

/// A batch stream over one store (`dbcore.data.BatchStream` wraps it; see rust/src/stream/).
#[pyclass(frozen, module = "dbcore._native")]
struct NativeStream {
    inner: std::sync::Mutex<stream::Stream>,
    noise: Option<stream::NoiseSpec>,
}

/// Owns one batch buffer while NumPy arrays view it, then gives it back to its stream's pool.
#[pyclass(frozen, module = "dbcore._native")]
struct BatchBuffer {
    buf: Vec<u8>,
    pool: Arc<stream::BufferPool>,
}

impl Drop for BatchBuffer {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// A writable uint8 array over `buf` that returns it to `pool` once collected (no copy).
fn pooled_array<'py>(
    py: Python<'py>,
    buf: Vec<u8>,
    pool: &Arc<stream::BufferPool>,
) -> PyResult<Bound<'py, numpy::PyArray1<u8>>> {
    let owner = Bound::new(
        py,
        BatchBuffer {
            buf,
            pool: pool.clone(),
        },
    )?;
    let view = numpy::ndarray::ArrayView1::from(owner.get().buf.as_slice());
    // SAFETY: the array keeps `owner` alive as its base, and `owner.buf` is never touched (so
    // never reallocated) until `owner` is dropped.
    Ok(unsafe { numpy::PyArray1::borrow_from_array(&view, owner.clone().into_any()) })
}

type BatchTuple<'py> = (
    u64,
    usize,
    Bound<'py, numpy::PyArray1<u64>>,
    Vec<Bound<'py, numpy::PyArray1<u8>>>,
    Option<Bound<'py, numpy::PyArray1<u8>>>,
    Option<Bound<'py, numpy::PyArray1<f64>>>,
);

impl NativeStream {
    fn lock(&self) -> std::sync::MutexGuard<'_, stream::Stream> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl NativeStream {
    #[new]
    #[pyo3(signature = (path, arrays, draws, batch_size, shuffle="chunks", seed=0, rank=0,
        world_size=1, drop_last=false, chunk_rows=None, window_chunks=None, window_bytes=None,
        threads=None, prefetch=4, worker=0, num_workers=1, noise=None, windows=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: StoreArg<'_>,
        arrays: Vec<String>,
        draws: Vec<bool>,
        batch_size: usize,
        shuffle: &str,
        seed: u64,
        rank: usize,
        world_size: usize,
        drop_last: bool,
        chunk_rows: Option<u64>,
        window_chunks: Option<u64>,
        window_bytes: Option<u64>,
        threads: Option<usize>,
        prefetch: usize,
        worker: usize,
        num_workers: usize,
        noise: Option<(u64, u32, usize, usize)>,
        windows: Option<(u64, u64, bool)>,
    ) -> PyResult<Self> {
        if draws.len() != arrays.len() {
            return Err(invalid("arrays and draws differ in length".into()));
        }
        let spec = stream::Spec {
            arrays: arrays
                .into_iter()
                .zip(draws)
                .map(|(name, draw)| stream::Selection { name, draw })
                .collect(),
            batch_size,
            mode: stream::Mode::from_name(shuffle).map_err(to_py)?,
            seed,
            rank,
            world_size,
            drop_last,
            chunk_rows,
            window_chunks,
            window_bytes,
            threads,
            prefetch,
            worker,
            num_workers,
            noise: noise.map(|(seed, block, gaussians, uniforms)| stream::NoiseSpec {
                seed,
                block,
                gaussians,
                uniforms,
            }),
            windows: windows.map(|(len, stride, jitter)| stream::Windows {
                len,
                stride,
                jitter,
            }),
        };
        let noise = spec.noise;
        let s = match path {
            StoreArg::Store(store) => {
                let store = Arc::clone(&store.get().inner);
                py.detach(|| stream::Stream::new(store, spec))
            }
            StoreArg::Path(path) => {
                let location = location(path)?;
                py.detach(|| stream::Stream::open(location, spec))
            }
        }
        .map_err(to_py)?;
        Ok(NativeStream {
            inner: std::sync::Mutex::new(s),
            noise,
        })
    }

    #[getter]
    fn num_samples(&self) -> u64 {
        self.lock().num_samples()
    }
    #[getter]
    fn num_batches(&self) -> usize {
        self.lock().num_batches()
    }
    #[getter]
    fn num_rank_samples(&self) -> usize {
        self.lock().num_rank_samples()
    }
    #[getter]
    fn chunk_rows(&self) -> u64 {
        self.lock().chunk_rows
    }
    #[getter]
    fn window_chunks(&self) -> u64 {
        self.lock().window_chunks
    }
    #[getter]
    fn threads(&self) -> usize {
        self.lock().threads
    }

    /// (name, row shape after draw selection, dtype) per array.
    fn outputs(&self) -> Vec<(String, Vec<u64>, &'static str)> {
        self.lock().outputs()
    }

    /// The epoch's global order and its window starts.
    fn order<'py>(
        &self,
        py: Python<'py>,
        epoch: u64,
    ) -> (Bound<'py, numpy::PyArray1<u64>>, Vec<usize>) {
        let o = py.detach(|| self.lock().order(epoch));
        (numpy::PyArray1::from_vec(py, o.order), o.window_starts)
    }

    /// Start (or restart) `epoch` at the rank's batch `position`.
    fn start(&self, py: Python<'_>, epoch: u64, position: usize) {
        py.detach(|| self.lock().start(epoch, position))
    }

    /// The next batch `(epoch, position, indices, [bytes per array], eps, uniforms)`, or None at
    /// the end of the epoch. With online noise, `eps` holds the flat (B * gaussians) float64
    /// values as native-endian bytes in a pooled buffer (view them as float64; None when
    /// gaussians == 0 or without noise), drawn for this batch alone, `uniforms` the flat (B * uniforms) one (None
    /// when uniforms == 0 or without noise). Waits without the GIL.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Option<BatchTuple<'py>>> {
        let (b, pool) = py.detach(|| {
            let mut s = self.lock();
            (s.next_batch(), s.buffers())
        });
        let Some(b) = b else {
            return Ok(None);
        };
        let b = b.map_err(to_py)?;
        let arrays = b
            .arrays
            .into_iter()
            .map(|a| pooled_array(py, a, &pool))
            .collect::<PyResult<Vec<_>>>()?;
        let (gaussians, uniforms) = self.noise.map_or((0, 0), |n| (n.gaussians, n.uniforms));
        Ok(Some((
            b.epoch,
            b.position,
            numpy::PyArray1::from_vec(py, b.indices),
            arrays,
            (gaussians > 0)
                .then(|| pooled_array(py, b.eps, &pool))
                .transpose()?,
            (uniforms > 0).then(|| numpy::PyArray1::from_vec(py, b.uniforms)),
        )))
    }

    /// Stop the background threads (joins them).
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.lock().stop())
    }
}

/// Philox4x32-10 of one counter under one key (`dbcore.rng.philox4x32`).
#[pyfunction]
fn philox4x32(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox::philox4x32(ctr, key)
}

fn samples_u32(samples: &numpy::PyReadonlyArray1<'_, u64>) -> PyResult<Vec<u32>> {
    samples
        .as_array()
        .iter()
        .map(|&s| {
            u32::try_from(s).map_err(|_| {
                invalid(format!(
                    "sample index {s} does not fit the generator's 32-bit counter"
                ))
            })
        })
        .collect()
}

/// Standard normal noise (len(samples) * num_elements,) float64, row-major (`dbcore.rng.gaussian`).
#[pyfunction]
fn gaussian<'py>(
    py: Python<'py>,
    samples: numpy::PyReadonlyArray1<'py, u64>,
    num_elements: usize,
    seed: u64,
    block: u32,
    draw: u32,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    let s = samples_u32(&samples)?;
    let out = py.detach(|| {
        let mut out = vec![0.0f64; s.len() * num_elements];
        if num_elements > 0 {
            for (row, &i) in out.chunks_mut(num_elements).zip(&s) {
                philox::gaussian_into(i, seed, block, draw, row);
            }
        }
        out
    });
    Ok(numpy::PyArray1::from_vec(py, out))
}

/// The sigma uniform of each sample (`dbcore.rng.uniform_for_sigma`).
#[pyfunction]
fn uniform_for_sigma<'py>(
    py: Python<'py>,
    samples: numpy::PyReadonlyArray1<'py, u64>,
    seed: u64,
    block: u32,
    draw: u32,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    let s = samples_u32(&samples)?;
    let out: Vec<f64> = s
        .iter()
        .map(|&i| philox::uniform_for_sigma(i, seed, block, draw))
        .collect();
    Ok(numpy::PyArray1::from_vec(py, out))
}

/// `count` uniforms in (0, 1) per sample, (len(samples) * count,) float64, row-major: uniform k
/// from counter group 0xFFFFFFFF - k / 4, output k % 4 (`dbcore.rng.uniforms_of`).
#[pyfunction]
fn uniforms<'py>(
    py: Python<'py>,
    samples: numpy::PyReadonlyArray1<'py, u64>,
    count: usize,
    seed: u64,
    block: u32,
    draw: u32,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    philox::check_request(0, count).map_err(invalid)?;
    let s = samples_u32(&samples)?;
    let out = py.detach(|| {
        let mut out = vec![0.0f64; s.len() * count];
        if count > 0 {
            for (row, &i) in out.chunks_mut(count).zip(&s) {
                philox::uniforms_into(i, seed, block, draw, row);
            }
        }
        out
    });
    Ok(numpy::PyArray1::from_vec(py, out))
}

/// Decode encoded images into `out` ((n, size, size, channels) uint8, C-contiguous) in parallel,
/// the GIL released; returns the (index, message) of the images that fail (`decode.rs`).
#[pyfunction]
fn decode_images(
    py: Python<'_>,
    blobs: Vec<Bound<'_, PyBytes>>,
    size: u32,
    channels: usize,
    out: &Bound<'_, PyUntypedArray>,
) -> PyResult<Vec<(usize, String)>> {
    if channels != 1 && channels != 3 {
        return Err(invalid(format!(
            "channels must be 1 or 3, found {channels}"
        )));
    }
    let shape = [blobs.len(), size as usize, size as usize, channels];
    if out.shape() != shape {
        return Err(invalid(format!(
            "out has shape {:?}, expected {shape:?}",
            out.shape()
        )));
    }
    let dst = array_mut(out, DType::UInt8)?;
    let slices: Vec<&[u8]> = blobs.iter().map(|b| b.as_bytes()).collect();
    Ok(py.detach(|| decode::decode_into(&slices, size, channels, dst)))
}

/// Set the disk cache of remote stores for the rest of the process: its folder (`objects` under
/// it) and its limit in bytes (0: off); None keeps the value in force. `reset`: back to the
/// environment's values, read at each open.
#[pyfunction]
#[pyo3(signature = (directory=None, limit=None, reset=false))]
fn configure_cache(
    directory: Option<PathBuf>,
    limit: Option<u64>,
    reset: bool,
) -> PyResult<(String, u64)> {
    if reset {
        remote::disk::reset();
    }
    let mut settings = remote::disk::settings().map_err(to_py)?;
    if reset && directory.is_none() && limit.is_none() {
        return Ok((settings.dir.display().to_string(), settings.limit));
    }
    if let Some(d) = directory {
        settings.dir = d.join("objects");
    }
    if let Some(l) = limit {
        settings.limit = l;
    }
    remote::disk::configure(settings.clone());
    Ok((settings.dir.display().to_string(), settings.limit))
}

/// The one-writer lock of an `s3://` store or run (`remote/lock.rs`); released by `release()`.
#[pyclass(module = "dbcore._native")]
struct RemoteLock {
    inner: Option<remote::lock::RemoteLock>,
    url: String,
}

#[pymethods]
impl RemoteLock {
    #[new]
    #[pyo3(signature = (location, what, lease_seconds, force=false))]
    fn new(
        py: Python<'_>,
        location: &str,
        what: &str,
        lease_seconds: f64,
        force: bool,
    ) -> PyResult<Self> {
        if !(lease_seconds.is_finite() && lease_seconds > 0.0) {
            return Err(invalid(format!(
                "lease_seconds must be > 0, got {lease_seconds}"
            )));
        }
        let loc = Location::parse(location).map_err(to_py)?;
        let lease = std::time::Duration::from_secs_f64(lease_seconds);
        let inner = py
            .detach(|| remote::lock::RemoteLock::acquire(&loc, what, lease, force))
            .map_err(to_py)?;
        Ok(RemoteLock {
            url: inner.url().to_string(),
            inner: Some(inner),
        })
    }

    fn release(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.inner.take() {
            Some(mut lock) => py.detach(move || lock.release()).map_err(to_py),
            None => Ok(()),
        }
    }

    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }
}

/// Streams row blocks into one array, encoding each shard once it is complete.
#[pyclass(frozen, module = "dbcore._native")]
struct NativeWriter {
    inner: RowWriter,
}

#[pymethods]
impl NativeWriter {
    fn write(&self, py: Python<'_>, start: u64, block: &Bound<'_, PyUntypedArray>) -> PyResult<()> {
        let bytes = array_ref(block, self.inner.handle().dtype())?;
        py.detach(|| self.inner.write(start, bytes)).map_err(to_py)
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush()).map_err(to_py)
    }

    #[getter]
    fn pending_rows(&self) -> u64 {
        self.inner.pending_rows()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeStore>()?;
    m.add_class::<NativeWriter>()?;
    m.add_class::<NativeStream>()?;
    m.add_class::<BatchBuffer>()?;
    m.add_function(wrap_pyfunction!(philox4x32, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian, m)?)?;
    m.add_function(wrap_pyfunction!(uniform_for_sigma, m)?)?;
    m.add_function(wrap_pyfunction!(uniforms, m)?)?;
    m.add_function(wrap_pyfunction!(decode_images, m)?)?;
    m.add_function(wrap_pyfunction!(configure_cache, m)?)?;
    m.add_class::<RemoteLock>()?;
    m.add("STREAM_MAX_THREADS", stream::MAX_THREADS)?;
    m.add("STREAM_DEFAULT_THREADS", stream::DEFAULT_THREADS)?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("FORMAT_VERSION", FORMAT_VERSION)?;
    Ok(())
}
