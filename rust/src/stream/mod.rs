//! Streaming mini-batches out of a store: each epoch's order (`order`), this reader's share of
//! it, read by background threads into pooled batch buffers (`buffers`), with online noise
//! (`noise`).
//!
//! The default window (at least `WINDOW_MIN_CHUNKS` chunks and `WINDOW_MIN_ROWS` rows, at most
//! `WINDOW_MAX_BYTES` of decoded rows but never under one chunk) depends on the store alone.
//! DataLoader worker w of W takes the rank's batches `position + w, position + w + W, ...`, so W
//! workers read in turn yield the rank's batches in order.
//!
//! **Pipeline.** One thread per running epoch and one decode pool (`threads`, at most
//! `MAX_THREADS`): the thread gathers the rows of each segment (this reader's samples of one
//! window, in consumption order) of every array, chunk by chunk in parallel, straight into the
//! buffers of the batches that hold them (only the epoch's draw of drawn arrays; a batch may
//! straddle two segments), adds online noise, and queues the complete batches: up to `prefetch`
//! plus one segment's worth, so that it decodes the next segment while the consumer takes the
//! last one's batches. Each batch buffer is written once and handed over as it is (no copy).
//! Uncompressed chunk and shard files are read through read-only memory maps kept for the
//! stream's lifetime (`store::FileMaps`: rows are `memcpy`d from the page cache, a file already
//! truncated is refused as corrupt; one truncated while mapped is out of scope).
//! A failed read ends the epoch with an error naming the array and the chunk; a panic of the
//! thread ends it with an error too, never silently.
//! Nothing here touches Python.

mod buffers;
mod noise;
mod order;
mod windows;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::philox;
use crate::store::{ArrayHandle, FileMaps, Scatter, Store};
use noise::add_noise;

pub use buffers::{BufferPool, POOL_MAX_BYTES};
pub use noise::NoiseSpec;
pub use order::{epoch_order, rank_batches, Mode, Order};
pub use windows::{Windows, DATA_BLOCK};

/// Hard cap on decode threads per stream.
pub const MAX_THREADS: usize = 16;
/// Default decode threads: min(this, available cores).
pub const DEFAULT_THREADS: usize = 4;
/// Default window: at least this many chunks ...
pub const WINDOW_MIN_CHUNKS: u64 = 4;
/// ... and at least this many rows (not batches: the order must not depend on the batch size or
/// the world size) ...
pub const WINDOW_MIN_ROWS: u64 = 4096;
/// ... unless a window's decoded rows (all arrays) would exceed this many bytes (never < 1 chunk).
pub const WINDOW_MAX_BYTES: u64 = 128 << 20;

/// The window (in whole chunks) that `bytes` of decoded rows hold: refused when it holds less than
/// one chunk or one global batch.
fn window_of_bytes(
    bytes: u64,
    row_bytes: u64,
    chunk_rows: u64,
    spec: &Spec,
    p: &impl std::fmt::Display,
) -> Result<u64> {
    let rows = bytes / row_bytes;
    let global = (spec.batch_size * spec.world_size) as u64;
    let need = chunk_rows.max(global);
    if rows < need {
        return Err(Error::Invalid(format!(
            "{p}: a shuffle window of {bytes} bytes holds {rows} rows of {row_bytes} bytes, fewer \
             than one {} ({need} rows, {} bytes)",
            if need == chunk_rows { "chunk" } else { "batch" },
            need * row_bytes
        )));
    }
    Ok(rows / chunk_rows)
}

/// For a remote store whose streamed arrays the disk cache cannot hold: the shard-aware order's
/// unit (the largest array's object rows: its shards) and window (in objects: at most a third of
/// the cache's limit, so that a window and the next one, prefetched, stay cached, and at most
/// `WINDOW_MAX_BYTES` of rows in memory). Each object is then downloaded once an epoch.
fn remote_unit(handles: &[Arc<ArrayHandle>], largest: &ArrayHandle) -> Option<(u64, u64)> {
    let mut stored = 0u64;
    let mut limit = 0u64;
    for h in handles {
        let (bytes, l) = h.cache_fit()?;
        stored += bytes;
        limit = l;
    }
    if stored <= limit {
        return None;
    }
    let rows = largest.object_rows().max(1);
    let object_bytes = (stored / largest.rows().div_ceil(rows).max(1)).max(1);
    let row_bytes: u64 = handles
        .iter()
        .map(|h| h.row_bytes() as u64)
        .sum::<u64>()
        .max(1);
    let by_cache = limit / 3 / object_bytes;
    let by_memory = WINDOW_MAX_BYTES / (rows * row_bytes).max(1);
    Some((rows, by_cache.min(by_memory).max(1)))
}

/// Tests only: the decode thread of this epoch panics.
#[cfg(test)]
const PANICKING_EPOCH: u64 = u64::MAX - 1;

/// One array to read, and whether to take the epoch's draw (`epoch % K` of axis 1) of it.
#[derive(Clone, Debug)]
pub struct Selection {
    pub name: String,
    pub draw: bool,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub arrays: Vec<Selection>,
    pub batch_size: usize,
    pub mode: Mode,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub drop_last: bool,
    /// Shuffle unit in rows (default: the read unit of the array with the largest rows).
    pub chunk_rows: Option<u64>,
    /// Shuffle window in chunks; or (when None) as many whole chunks as `window_bytes` of decoded
    /// rows hold; or (both None) the default window.
    pub window_chunks: Option<u64>,
    pub window_bytes: Option<u64>,
    pub threads: Option<usize>,
    pub prefetch: usize,
    pub worker: usize,
    pub num_workers: usize,
    pub noise: Option<NoiseSpec>,
    /// Cut each sample from flat 1-D arrays at read time (`windows`); None: a sample is a row.
    pub windows: Option<Windows>,
}

/// One mini-batch: `position` is its index among the rank's batches of the epoch.
pub struct Batch {
    pub epoch: u64,
    pub position: usize,
    pub indices: Vec<u64>,
    pub arrays: Vec<Vec<u8>>,
    /// Online noise: `gaussians` f64 per sample, row-major, as native-endian bytes in a pooled
    /// buffer (empty without noise or with 0).
    pub eps: Vec<u8>,
    /// Online noise: `uniforms` per sample, row-major (empty without noise or with 0).
    pub uniforms: Vec<f64>,
}

struct Ctx {
    spec: Spec,
    handles: Vec<Arc<ArrayHandle>>,
    pool: rayon::ThreadPool,
    buffers: Arc<BufferPool>,
    /// Maps of the uncompressed chunk and shard files read so far.
    maps: FileMaps,
    /// A remote store read through a disk cache that holds it: every object of an epoch is
    /// prefetched at its start (else one segment ahead).
    prefetch_epoch: bool,
}

struct Running {
    rx: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None; // unblocks a full queue
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A batch reader over one store (see the module docs). Start an epoch with `start`, then `next`.
pub struct Stream {
    store: Arc<Store>,
    ctx: Arc<Ctx>,
    n: u64,
    pub chunk_rows: u64,
    pub window_chunks: u64,
    pub threads: usize,
    running: Option<Running>,
    pid: u32,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A forked child: the threads (and any lock they held) exist only in the parent.
            // Leak everything rather than join threads that are not there.
            std::mem::forget(self.running.take());
            std::mem::forget(self.ctx.clone());
            std::mem::forget(self.store.clone());
        }
    }
}

impl Stream {
    /// Open the complete store at `location` for `spec` (an incomplete store is refused).
    pub fn open(location: impl Into<crate::location::Location>, spec: Spec) -> Result<Stream> {
        let store = Arc::new(Store::open(location, true)?);
        Stream::new(store, spec)
    }

    pub fn new(store: Arc<Store>, spec: Spec) -> Result<Stream> {
        let p = store.root().to_string();
        if spec.arrays.is_empty() {
            return Err(Error::Invalid(format!("{p}: no arrays to stream")));
        }
        if spec.batch_size == 0 {
            return Err(Error::Invalid(format!("{p}: batch_size must be >= 1")));
        }
        if spec.world_size == 0 || spec.rank >= spec.world_size {
            return Err(Error::Invalid(format!(
                "{p}: rank {} is outside 0..world_size {}",
                spec.rank, spec.world_size
            )));
        }
        if spec.num_workers == 0 || spec.worker >= spec.num_workers {
            return Err(Error::Invalid(format!(
                "{p}: worker {} is outside 0..{}",
                spec.worker, spec.num_workers
            )));
        }
        if let Some(ns) = spec.noise {
            philox::check_request(ns.gaussians, ns.uniforms)
                .map_err(|e| Error::Invalid(format!("{p}: {e}")))?;
        }
        let mut handles = Vec::new();
        for sel in &spec.arrays {
            let h = store.array(&sel.name)?;
            if sel.draw && (h.shape().len() < 2 || h.shape()[1] == 0) {
                return Err(Error::Invalid(format!(
                    "{p}: array '{}': a drawn array needs shape (N, K, ...), has {:?}",
                    sel.name,
                    h.shape()
                )));
            }
            handles.push(h);
        }
        let rows = handles[0].rows();
        if let Some(h) = handles.iter().find(|h| h.rows() != rows) {
            return Err(Error::Invalid(format!(
                "{p}: array '{}' has {} rows, '{}' has {rows}",
                h.name,
                h.rows(),
                handles[0].name
            )));
        }
        let n = match spec.windows {
            None => rows,
            Some(w) => {
                if let Some(h) = handles.iter().find(|h| h.shape().len() != 1) {
                    return Err(Error::Invalid(format!(
                        "{p}: array '{}' has shape {:?}: windows are cut from 1-D arrays only",
                        h.name,
                        h.shape()
                    )));
                }
                w.count(rows, &format!("{p}: array '{}'", handles[0].name))?
            }
        };
        // Bytes of one streamed sample of each array.
        let sample_bytes =
            |h: &ArrayHandle| h.row_bytes() * spec.windows.map_or(1, |w| w.len as usize);
        // An epoch's order and batches take about 32 bytes a sample, a batch its rows: refuse
        // (corrupt) shapes that memory cannot hold rather than abort on an allocation later.
        let fits = |bytes: Option<u64>| {
            let bytes = bytes.and_then(|b| usize::try_from(b).ok());
            bytes.is_some_and(|b| Vec::<u8>::new().try_reserve_exact(b).is_ok())
        };
        if !fits(n.checked_mul(32)) {
            return Err(Error::Corrupt(format!(
                "{p}: array '{}': {n} rows: the order of an epoch does not fit in memory",
                handles[0].name
            )));
        }
        for h in &handles {
            if !fits((sample_bytes(h) as u64).checked_mul(spec.batch_size as u64)) {
                return Err(Error::Corrupt(format!(
                    "{p}: array '{}': a batch of {} rows of {} bytes does not fit in memory",
                    h.name,
                    spec.batch_size,
                    sample_bytes(h)
                )));
            }
        }
        if n > u32::MAX as u64 && spec.noise.is_some() {
            return Err(Error::Invalid(format!(
                "{p}: {n} samples do not fit the generator's 32-bit counter"
            )));
        }
        // Default shuffle unit: the read unit of the array with the largest rows (it dominates I/O),
        // in samples (windows start every `stride` rows); for a remote store that the disk cache
        // cannot hold, its objects (`remote_unit`).
        let largest = handles
            .iter()
            .max_by_key(|h| h.row_bytes())
            .expect("arrays");
        let shard_window = match (spec.chunk_rows, spec.mode, spec.windows) {
            (None, Mode::Chunks, None) => remote_unit(&handles, largest),
            _ => None,
        };
        let chunk_rows = spec
            .chunk_rows
            .or(shard_window.map(|(rows, _)| rows))
            .unwrap_or_else(|| largest.unit_rows() / spec.windows.map_or(1, |w| w.stride))
            .max(1);
        let row_bytes: u64 = handles
            .iter()
            .map(|h| sample_bytes(h) as u64)
            .sum::<u64>()
            .max(1);
        let window_chunks = match (spec.window_chunks, spec.window_bytes, shard_window) {
            (Some(w), _, _) => w,
            (None, Some(bytes), _) => window_of_bytes(bytes, row_bytes, chunk_rows, &spec, &p)?,
            (None, None, Some((_, objects))) => objects,
            (None, None, None) => {
                let want = (WINDOW_MIN_CHUNKS * chunk_rows).max(WINDOW_MIN_ROWS);
                let cap = (WINDOW_MAX_BYTES / row_bytes).max(chunk_rows);
                want.min(cap).div_ceil(chunk_rows).max(1)
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let threads = spec
            .threads
            .unwrap_or(DEFAULT_THREADS.min(cores))
            .clamp(1, MAX_THREADS);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("dbcore-decode-{i}"))
            .build()
            .map_err(|e| Error::Io(format!("{p}: cannot start decode threads: {e}")))?;
        Ok(Stream {
            store,
            ctx: Arc::new(Ctx {
                spec,
                handles,
                pool,
                buffers: Arc::new(BufferPool::default()),
                maps: FileMaps::default(),
                prefetch_epoch: shard_window.is_none(),
            }),
            n,
            chunk_rows,
            window_chunks,
            threads,
            running: None,
            pid: std::process::id(),
        })
    }

    pub fn num_samples(&self) -> u64 {
        self.n
    }

    /// This rank's batches of an epoch, as position ranges (all workers together).
    fn my_batches(&self) -> Vec<(usize, usize)> {
        let s = &self.ctx.spec;
        rank_batches(
            self.n as usize,
            s.batch_size,
            s.rank,
            s.world_size,
            s.drop_last,
        )
    }

    /// Batches of this rank per epoch (all workers together).
    pub fn num_batches(&self) -> usize {
        self.my_batches().len()
    }

    /// Samples of this rank per epoch.
    pub fn num_rank_samples(&self) -> usize {
        self.my_batches().iter().map(|(a, b)| b - a).sum()
    }

    /// Per array: output row shape (after draw selection) and dtype name.
    pub fn outputs(&self) -> Vec<(String, Vec<u64>, &'static str)> {
        self.ctx
            .handles
            .iter()
            .zip(&self.ctx.spec.arrays)
            .map(|(h, sel)| {
                let shape = match self.ctx.spec.windows {
                    Some(w) => vec![w.len],
                    None => h.shape()[if sel.draw { 2 } else { 1 }..].to_vec(),
                };
                (sel.name.clone(), shape, h.dtype().name())
            })
            .collect()
    }

    pub fn order(&self, epoch: u64) -> Order {
        let s = &self.ctx.spec;
        epoch_order(
            self.n,
            s.seed,
            epoch,
            s.mode,
            self.chunk_rows,
            self.window_chunks,
        )
    }

    /// Stop any running epoch and start `epoch` at the rank's batch `position`.
    pub fn start(&mut self, epoch: u64, position: usize) {
        self.running = None;
        let s = &self.ctx.spec;
        let order = self.order(epoch);
        let window = order.window_of();
        let mut seq = Vec::new(); // this reader's samples in consumption order
        let mut seq_window = Vec::new();
        let mut batches = Vec::new(); // (position, start, end) into seq
        let all = rank_batches(
            self.n as usize,
            s.batch_size,
            s.rank,
            s.world_size,
            s.drop_last,
        );
        for (pos, &(lo, hi)) in all.iter().enumerate().skip(position) {
            if (pos - position) % s.num_workers != s.worker {
                continue;
            }
            batches.push((pos, seq.len(), seq.len() + hi - lo));
            seq.extend_from_slice(&order.order[lo..hi]);
            seq_window.extend_from_slice(&window[lo..hi]);
        }
        let mut segments = Vec::new(); // [start, end) into seq
        let mut start = 0;
        for i in 1..=seq.len() {
            if i == seq.len() || seq_window[i] != seq_window[start] {
                segments.push((start, i));
                start = i;
            }
        }
        // Room for a whole segment's batches beyond `prefetch`, so that the thread decodes the next
        // segment while the consumer works through the last one.
        let per_segment = segments
            .iter()
            .map(|&(a, b)| (b - a).div_ceil(s.batch_size.max(1)) + 1)
            .max()
            .unwrap_or(0);
        let (tx, rx) = sync_channel(s.prefetch.max(1) + per_segment);
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = self.ctx.clone();
        let stop2 = stop.clone();
        let seq = Arc::new(seq);
        // A failure of the thread (a panic, or no thread at all) ends the epoch with an error.
        let p = self.store.root().to_string();
        let (failed, unstarted) = (tx.clone(), tx.clone());
        let thread = std::thread::Builder::new()
            .name("dbcore-decode".into())
            .spawn(move || {
                let run = || decode_batches(ctx, epoch, seq, segments, batches, tx, stop2);
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    let _ = failed.send(Err(Error::Corrupt(format!(
                        "{p}: reading epoch {epoch} failed: {msg}"
                    ))));
                }
            })
            .map_err(|e| {
                let p = self.store.root();
                let msg = format!("{p}: cannot start the stream thread: {e}");
                let _ = unstarted.try_send(Err(Error::Io(msg)));
            })
            .ok();
        self.running = Some(Running {
            rx: Some(rx),
            stop,
            thread,
        });
    }

    /// The next batch of the running epoch; None at its end (or when none was started). Its
    /// online noise is drawn here, for this batch alone, into pooled buffers: noise memory is
    /// bounded by the batches the consumer holds, whatever the window or the noise width.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        let r = self.running.as_ref()?;
        match r.rx.as_ref()?.recv() {
            Ok(b) => Some(b.map(|b| add_noise(&self.ctx, b))),
            Err(_) => {
                self.running = None;
                None
            }
        }
    }

    pub fn stop(&mut self) {
        self.running = None;
    }

    /// Where the consumer may give batch buffers back once done with them.
    pub fn buffers(&self) -> Arc<BufferPool> {
        self.ctx.buffers.clone()
    }
}

/// Output row bytes and the byte offset of the epoch's draw inside a stored row, per array.
fn picks(ctx: &Ctx, epoch: u64) -> Vec<(usize, usize)> {
    ctx.handles
        .iter()
        .zip(&ctx.spec.arrays)
        .map(|(h, sel)| {
            if let Some(w) = ctx.spec.windows {
                (h.row_bytes() * w.len as usize, 0)
            } else if sel.draw {
                let k = h.shape()[1];
                let sub = h.row_bytes() / k as usize;
                (sub, (epoch % k) as usize * sub)
            } else {
                (h.row_bytes(), 0)
            }
        })
        .collect()
}

/// The epoch's thread: decodes segment after segment straight into the buffers of the batches
/// that hold their rows (a batch may straddle two segments), adds online noise, and sends each
/// batch once complete.
fn decode_batches(
    ctx: Arc<Ctx>,
    epoch: u64,
    seq: Arc<Vec<u64>>,
    segments: Vec<(usize, usize)>,
    batches: Vec<(usize, usize, usize)>,
    tx: SyncSender<Result<Batch>>,
    stop: Arc<AtomicBool>,
) {
    #[cfg(test)]
    assert!(epoch != PANICKING_EPOCH, "a bug in the decode thread");
    let picks = picks(&ctx, epoch);
    let new_batch = |(position, a, b): (usize, usize, usize)| Batch {
        epoch,
        position,
        indices: seq[a..b].to_vec(),
        arrays: picks
            .iter()
            .map(|&(rb, _)| ctx.buffers.take((b - a) * rb))
            .collect(),
        eps: Vec::new(),
        uniforms: Vec::new(),
    };
    // Batches being filled, in order, with their [start, end) into seq.
    let mut open: VecDeque<(usize, usize, Batch)> = VecDeque::new();
    let mut next = 0; // the next batch to allocate
    let send = |done: Vec<Batch>| -> bool { done.into_iter().all(|b| tx.send(Ok(b)).is_ok()) };
    // A remote store's objects start downloading before they are read: when the cache holds the
    // store, all that the epoch reads, in the order the segments need them (downloads queue first
    // come, first served); else those of the next segment, one segment ahead.
    let prefetch = |(start, end): (usize, usize)| {
        for h in &ctx.handles {
            match ctx.spec.windows {
                Some(w) => h.prefetch_rows(seq[start..end].iter().flat_map(|&s| {
                    let at = w.offset(s, epoch, ctx.spec.seed, h.rows());
                    [at, at + w.len - 1]
                })),
                None => h.prefetch_rows(seq[start..end].iter().copied()),
            }
        }
    };
    let ahead = if ctx.prefetch_epoch {
        segments.len()
    } else {
        1
    };
    segments.iter().take(ahead).for_each(|&s| prefetch(s));
    for (i, &(start, end)) in segments.iter().enumerate() {
        if let Some(&next) = segments.get(i + 1).filter(|_| !ctx.prefetch_epoch) {
            prefetch(next);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        while next < batches.len() && batches[next].1 < end {
            let (_, a, b) = batches[next];
            open.push_back((a, b, new_batch(batches[next])));
            next += 1;
        }
        let samples = &seq[start..end];
        let filled = ctx.pool.install(|| -> Result<()> {
            for (i, h) in ctx.handles.iter().enumerate() {
                let (rb, col) = picks[i];
                let mut slots = Vec::with_capacity(samples.len());
                let mut k = 0;
                for p in start..end {
                    while open[k].1 <= p {
                        k += 1;
                    }
                    slots.push((k, (p - open[k].0) * rb));
                }
                let pieces = open
                    .iter_mut()
                    .map(|(_, _, b)| b.arrays[i].as_mut_slice())
                    .collect();
                // a failure names the array and the chunk
                let out = Scatter::new(pieces, slots, rb)?;
                match ctx.spec.windows {
                    Some(w) => {
                        let starts: Vec<u64> = samples
                            .iter()
                            .map(|&s| w.offset(s, epoch, ctx.spec.seed, h.rows()))
                            .collect();
                        h.read_windows_scatter(&starts, w.len, &out)?
                    }
                    None => h.read_rows_scatter_mapped(samples, col, &out, Some(&ctx.maps))?,
                }
            }
            Ok(())
        });
        if let Err(e) = filled {
            let _ = tx.send(Err(e));
            return;
        }
        let mut done = Vec::new();
        while open.front().is_some_and(|o| o.1 <= end) {
            done.push(open.pop_front().unwrap().2);
        }
        if !send(done) {
            return;
        }
    }
    // Whatever is left holds no rows (empty batches of a rank past the last sample).
    let rest = open
        .into_iter()
        .map(|o| o.2)
        .chain(batches[next..].iter().map(|&b| new_batch(b)))
        .collect();
    send(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::store::{ArraySpec, Compression};
    use serde_json::Map;

    /// Chunk-shuffled batches of `batch` rows of the arrays `(name, draw)`, on 2 threads.
    pub(super) fn spec(arrays: &[(&str, bool)], batch: usize) -> Spec {
        Spec {
            arrays: arrays
                .iter()
                .map(|&(n, d)| Selection {
                    name: n.into(),
                    draw: d,
                })
                .collect(),
            batch_size: batch,
            mode: Mode::Chunks,
            seed: 1,
            rank: 0,
            world_size: 1,
            drop_last: false,
            chunk_rows: None,
            window_chunks: Some(2),
            window_bytes: None,
            threads: Some(2),
            prefetch: 2,
            worker: 0,
            num_workers: 1,
            noise: None,
            windows: None,
        }
    }

    #[test]
    fn a_window_in_bytes_holds_whole_chunks_and_at_least_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let spec_x = ArraySpec {
            shape: vec![100, 2],
            dtype: DType::Int32,
            chunk_rows: 4,
            shard_rows: None,
            compression: Compression::Zstd(1),
        };
        let x = s.create_array("x", &spec_x).unwrap();
        x.write_rows(0, &[0u8; 100 * 8]).unwrap();
        s.finalize().unwrap();
        let mut sp = spec(&[("x", false)], 8);
        sp.window_chunks = None;
        sp.window_bytes = Some(8 * 23); // 23 rows of 8 bytes: 5 whole chunks of 4 rows
        assert_eq!(Stream::open(&path, sp.clone()).unwrap().window_chunks, 5);
        sp.window_bytes = Some(8 * 7); // fewer rows than one batch of 8
        let err = Stream::open(&path, sp).err().unwrap().to_string();
        assert!(
            err.contains("fewer than one batch (8 rows, 64 bytes)"),
            "{err}"
        );
    }

    #[test]
    fn streams_rows_and_draws() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let mk = |shape: Vec<u64>| ArraySpec {
            shape,
            dtype: DType::Int32,
            chunk_rows: 4,
            shard_rows: Some(8),
            compression: Compression::Zstd(1),
        };
        let x = s.create_array("x", &mk(vec![30, 2])).unwrap();
        let bytes: Vec<u8> = (0..60i32).flat_map(|v| v.to_ne_bytes()).collect();
        x.write_rows(0, &bytes).unwrap();
        let z = s.create_array("z", &mk(vec![30, 3])).unwrap();
        let zb: Vec<u8> = (0..90i32).flat_map(|v| v.to_ne_bytes()).collect();
        z.write_rows(0, &zb).unwrap();
        s.finalize().unwrap();
        let mut st = Stream::open(&path, spec(&[("x", false), ("z", true)], 7)).unwrap();
        assert_eq!(st.num_batches(), 5);
        for epoch in 0..4u64 {
            st.start(epoch, 0);
            let mut seen = Vec::new();
            while let Some(b) = st.next_batch() {
                let b = b.unwrap();
                for (i, &r) in b.indices.iter().enumerate() {
                    let xv = i32::from_ne_bytes(b.arrays[0][i * 8..i * 8 + 4].try_into().unwrap());
                    assert_eq!(xv as u64, 2 * r);
                    let zv = i32::from_ne_bytes(b.arrays[1][i * 4..i * 4 + 4].try_into().unwrap());
                    assert_eq!(zv as u64, 3 * r + epoch % 3);
                }
                seen.extend(b.indices);
            }
            assert_eq!(seen, st.order(epoch).order);
        }
        // resume at batch 3 gives the tail
        st.start(1, 3);
        let tail: Vec<u64> = std::iter::from_fn(|| st.next_batch())
            .flat_map(|b| b.unwrap().indices)
            .collect();
        assert_eq!(tail, st.order(1).order[21..]);
    }

    #[test]
    fn streams_windows_cut_from_a_flat_array() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let spec_t = ArraySpec {
            shape: vec![1000],
            dtype: DType::UInt16,
            chunk_rows: 64,
            shard_rows: Some(256),
            compression: Compression::Zstd(1),
        };
        let t = s.create_array("tokens", &spec_t).unwrap();
        let bytes: Vec<u8> = (0..1000u16).flat_map(|v| v.to_ne_bytes()).collect();
        t.write_rows(0, &bytes).unwrap();
        s.finalize().unwrap();
        let w = Windows {
            len: 10,
            stride: 5,
            jitter: true,
        };
        let mut sp = spec(&[("tokens", false)], 16);
        sp.windows = Some(w);
        let mut st = Stream::open(&path, sp).unwrap();
        assert_eq!(st.num_samples(), (1000 - 10) / 5 + 1);
        assert_eq!(st.outputs()[0].1, vec![10]);
        for epoch in 0..2u64 {
            st.start(epoch, 0);
            let mut seen = Vec::new();
            while let Some(b) = st.next_batch() {
                let b = b.unwrap();
                for (i, &r) in b.indices.iter().enumerate() {
                    let a = w.offset(r, epoch, 1, 1000);
                    let row: Vec<u16> = b.arrays[0][i * 20..(i + 1) * 20]
                        .chunks(2)
                        .map(|c| u16::from_ne_bytes(c.try_into().unwrap()))
                        .collect();
                    assert_eq!(row, (a as u16..a as u16 + 10).collect::<Vec<_>>());
                }
                seen.extend(b.indices);
            }
            assert_eq!(seen, st.order(epoch).order);
        }
        let mut two_d = spec(&[("tokens", false)], 4);
        two_d.windows = Some(Windows { len: 2000, ..w });
        let err = Stream::open(&path, two_d).err().unwrap().to_string();
        assert!(err.contains("fewer than one window of 2000"), "{err}");
    }

    #[test]
    fn a_panicking_decode_thread_ends_the_epoch_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let x = s
            .create_array(
                "x",
                &ArraySpec {
                    shape: vec![10],
                    dtype: DType::UInt8,
                    chunk_rows: 4,
                    shard_rows: None,
                    compression: Compression::None,
                },
            )
            .unwrap();
        x.write_rows(0, &[1u8; 10]).unwrap();
        s.finalize().unwrap();
        let mut st = Stream::open(&path, spec(&[("x", false)], 3)).unwrap();
        st.start(PANICKING_EPOCH, 0);
        match st.next_batch() {
            Some(Err(Error::Corrupt(m))) => {
                assert!(m.contains("a bug in the decode thread"), "{m}")
            }
            other => panic!(
                "expected the thread's panic as an error, got {:?}",
                other.map(|b| b.map(|b| b.indices))
            ),
        }
        assert!(st.next_batch().is_none());
        st.start(0, 0);
        assert_eq!(
            std::iter::from_fn(|| st.next_batch())
                .map(|b| b.unwrap().indices.len())
                .sum::<usize>(),
            10
        );
    }

    #[test]
    fn new_streams_an_open_store_without_reading_its_metadata_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.zarr");
        let s = Store::create(&path, Map::new(), false).unwrap();
        let x = s
            .create_array(
                "x",
                &ArraySpec {
                    shape: vec![10, 2],
                    dtype: DType::Int32,
                    chunk_rows: 4,
                    shard_rows: None,
                    compression: Compression::Zstd(1),
                },
            )
            .unwrap();
        let bytes: Vec<u8> = (0..20i32).flat_map(|v| v.to_ne_bytes()).collect();
        x.write_rows(0, &bytes).unwrap();
        s.finalize().unwrap();
        // Open (and so cache) 'x', then remove the metadata of the group and of the array: the
        // store cannot be opened again, the open one still streams.
        let store = Arc::new(Store::open(&path, true).unwrap());
        std::fs::remove_file(path.join("zarr.json")).unwrap();
        std::fs::remove_file(path.join("x/zarr.json")).unwrap();
        assert!(Stream::open(&path, spec(&[("x", false)], 3)).is_err());
        let mut st = Stream::new(Arc::clone(&store), spec(&[("x", false)], 3)).unwrap();
        assert!(Arc::ptr_eq(&st.ctx.handles[0], &store.array("x").unwrap()));
        st.start(0, 0);
        let mut seen = Vec::new();
        while let Some(b) = st.next_batch() {
            let b = b.unwrap();
            for (i, &r) in b.indices.iter().enumerate() {
                let v = i32::from_ne_bytes(b.arrays[0][i * 8..i * 8 + 4].try_into().unwrap());
                assert_eq!(v as u64, 2 * r);
            }
            seen.extend(b.indices);
        }
        assert_eq!(seen, st.order(0).order);
    }
}
