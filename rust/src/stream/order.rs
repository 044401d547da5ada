//! The order of an epoch and its cut among ranks: pure functions of the seed, the epoch and the
//! chunking, never of threads or I/O.
//!
//! **Order.** The global order of an epoch is a pure function of (n, seed, epoch, chunk_rows,
//! window_chunks, mode), never of the rank, the world size or the number of workers:
//! - `Chunks` (default): the read units (chunks of `chunk_rows` rows) are shuffled, cut into
//!   windows of `window_chunks` consecutive shuffled chunks, and the samples of each window are
//!   shuffled among themselves. A batch therefore mixes samples of a whole window (every one of
//!   its chunks), and each chunk is decoded once per window and rank.
//!   For a remote store that the disk cache cannot hold, the stream takes whole objects (shards) as
//!   the chunks (`stream::remote_unit`): the shard-aware order.
//! - `Exact`: one uniform permutation of all n samples (every segment then touches every chunk).
//! - `Sequential`: 0..n.
//!
//! The random words come from Philox4x32-10 keyed by `seed`, counters tagged apart from noise.
//!
//! **Sharding.** The order is cut into global batches of `batch_size * world_size`; rank r takes
//! the r-th slice of `batch_size` of each. A final partial global batch is dropped with
//! `drop_last`, else split into `world_size` near-equal contiguous parts (one smaller batch each,
//! possibly empty): no sample is repeated and none is left out.

use crate::error::{Error, Result};
use crate::philox::Counter;

const TAG_CHUNKS: u32 = 0x5348_0001;
const TAG_WINDOWS: u32 = 0x5348_0002;
const TAG_EXACT: u32 = 0x5348_0003;

/// How an epoch's samples are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sequential,
    Chunks,
    Exact,
}

impl Mode {
    pub fn from_name(s: &str) -> Result<Mode> {
        match s {
            "sequential" | "none" => Ok(Mode::Sequential),
            "chunks" => Ok(Mode::Chunks),
            "exact" => Ok(Mode::Exact),
            _ => Err(Error::Invalid(format!(
                "shuffle must be 'chunks', 'exact' or 'sequential', got {s:?}"
            ))),
        }
    }
}

/// The global order of one epoch and where its windows start (positions into the order).
pub struct Order {
    pub order: Vec<u64>,
    pub window_starts: Vec<usize>,
}

impl Order {
    /// Window index of every position (non-decreasing).
    pub fn window_of(&self) -> Vec<u32> {
        let mut w = vec![0u32; self.order.len()];
        for (i, pair) in self.window_starts.windows(2).enumerate() {
            w[pair[0]..pair[1]].fill(i as u32);
        }
        if let Some(&last) = self.window_starts.last() {
            w[last..].fill(self.window_starts.len() as u32 - 1);
        }
        w
    }
}

/// The global order of `epoch` (see the module docs).
pub fn epoch_order(
    n: u64,
    seed: u64,
    epoch: u64,
    mode: Mode,
    chunk_rows: u64,
    window_chunks: u64,
) -> Order {
    let chunk_rows = chunk_rows.max(1);
    let window_chunks = window_chunks.max(1);
    let window_rows = (chunk_rows * window_chunks) as usize;
    let e = epoch as u32;
    match mode {
        Mode::Chunks => {
            let n_chunks = n.div_ceil(chunk_rows);
            let mut chunks: Vec<u64> = (0..n_chunks).collect();
            Counter::new(seed, [TAG_CHUNKS, e]).shuffle(&mut chunks);
            let mut order = Vec::with_capacity(n as usize);
            let mut starts = Vec::new();
            for (w, win) in chunks.chunks(window_chunks as usize).enumerate() {
                let start = order.len();
                starts.push(start);
                for &c in win {
                    order.extend(c * chunk_rows..((c + 1) * chunk_rows).min(n));
                }
                let mut rng = Counter::new(seed, [TAG_WINDOWS, e]);
                rng.skip((w as u64) << 40);
                rng.shuffle(&mut order[start..]);
            }
            Order {
                order,
                window_starts: starts,
            }
        }
        Mode::Exact | Mode::Sequential => {
            let mut order: Vec<u64> = (0..n).collect();
            if mode == Mode::Exact {
                Counter::new(seed, [TAG_EXACT, e]).shuffle(&mut order);
            }
            let starts = (0..order.len()).step_by(window_rows).collect();
            Order {
                order,
                window_starts: starts,
            }
        }
    }
}

/// The batches of `rank` as ranges of positions into an order of `n` (see the module docs).
pub fn rank_batches(
    n: usize,
    batch_size: usize,
    rank: usize,
    world: usize,
    drop_last: bool,
) -> Vec<(usize, usize)> {
    let b = batch_size.max(1);
    let g = b * world.max(1);
    let full = n / g;
    let mut out: Vec<(usize, usize)> = (0..full)
        .map(|i| (i * g + rank * b, i * g + (rank + 1) * b))
        .collect();
    let rem = n - full * g;
    if rem > 0 && !drop_last {
        let start = full * g;
        out.push((start + rem * rank / world, start + rem * (rank + 1) / world));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_permutations_and_deterministic() {
        for mode in [Mode::Sequential, Mode::Chunks, Mode::Exact] {
            let o = epoch_order(1003, 7, 2, mode, 10, 3);
            let mut s = o.order.clone();
            s.sort_unstable();
            assert_eq!(s, (0..1003).collect::<Vec<_>>());
            assert_eq!(o.order, epoch_order(1003, 7, 2, mode, 10, 3).order);
            if mode != Mode::Sequential {
                assert_ne!(o.order, epoch_order(1003, 7, 3, mode, 10, 3).order);
            }
            let w = o.window_of();
            assert!(w.windows(2).all(|p| p[0] <= p[1]));
        }
        // chunk mode: each window holds exactly the samples of its (whole) chunks
        let o = epoch_order(1003, 7, 2, Mode::Chunks, 10, 3);
        for (i, &s) in o.window_starts.iter().enumerate() {
            let e = o.window_starts.get(i + 1).copied().unwrap_or(o.order.len());
            let mut chunks: Vec<u64> = o.order[s..e].iter().map(|r| r / 10).collect();
            chunks.sort_unstable();
            chunks.dedup();
            assert!(chunks.len() <= 3);
        }
    }

    #[test]
    fn ranks_cover_without_overlap() {
        for (n, b, w, drop) in [
            (103, 8, 3, false),
            (103, 8, 3, true),
            (7, 4, 4, false),
            (64, 8, 2, true),
        ] {
            let mut seen = vec![0u32; n];
            for r in 0..w {
                for (lo, hi) in rank_batches(n, b, r, w, drop) {
                    assert!(hi - lo <= b);
                    seen[lo..hi].iter_mut().for_each(|c| *c += 1);
                }
            }
            assert!(seen.iter().all(|&c| c <= 1));
            if !drop {
                assert!(seen.iter().all(|&c| c == 1));
            } else {
                assert_eq!(
                    seen.iter().filter(|&&c| c == 1).count(),
                    n / (b * w) * b * w
                );
            }
        }
    }
}
