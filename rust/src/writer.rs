//! Streamed writes: rows arrive in blocks of any size and order; each shard (or unsharded chunk)
//! is encoded once, when all its rows have arrived, instead of once per block.
//!
//! Rows wait in memory until their write unit is full or `flush` is called, so memory holds at
//! most the partly written units (one or two when blocks arrive in order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::store::ArrayHandle;

struct Pending {
    buf: Vec<u8>,
    filled: Vec<bool>,
    n_filled: u64,
}

/// Buffers partial write units of one array; share it between threads freely.
pub struct RowWriter {
    handle: Arc<ArrayHandle>,
    unit_rows: u64,
    pending: Mutex<HashMap<u64, Pending>>,
}

impl RowWriter {
    pub fn new(handle: Arc<ArrayHandle>) -> Self {
        let unit_rows = handle.write_unit_rows();
        RowWriter {
            handle,
            unit_rows,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn handle(&self) -> &Arc<ArrayHandle> {
        &self.handle
    }

    fn unit_span(&self, unit: u64) -> (u64, u64) {
        let lo = unit * self.unit_rows;
        (lo, (lo + self.unit_rows).min(self.handle.rows()))
    }

    /// Write rows `start..start + bytes.len() / row_bytes`.
    pub fn write(&self, start: u64, bytes: &[u8]) -> Result<()> {
        let rb = self.handle.row_bytes() as u64;
        let n = self.handle.check_block(start, bytes.len())?;
        let end = start + n;
        if n == 0 {
            return Ok(());
        }
        // Whole units in the middle go straight to disk from the caller's buffer.
        let first_full = start.div_ceil(self.unit_rows);
        let last_full = if end == self.handle.rows() {
            end.div_ceil(self.unit_rows)
        } else {
            end / self.unit_rows
        };
        let (full_lo, full_hi) = if first_full < last_full {
            (
                self.unit_span(first_full).0,
                self.unit_span(last_full - 1).1,
            )
        } else {
            (end, end)
        };
        let mut ready = Vec::new();
        {
            let mut pending = self.pending.lock().unwrap();
            for unit in first_full..last_full.max(first_full) {
                pending.remove(&unit); // entirely overwritten below
            }
            for (lo, hi) in [(start, full_lo.min(end)), (full_hi.max(start), end)] {
                let mut row = lo;
                while row < hi {
                    let unit = row / self.unit_rows;
                    let (ulo, uhi) = self.unit_span(unit);
                    let piece_hi = hi.min(uhi);
                    let p = pending.entry(unit).or_insert_with(|| Pending {
                        buf: vec![0; ((uhi - ulo) * rb) as usize],
                        filled: vec![false; (uhi - ulo) as usize],
                        n_filled: 0,
                    });
                    let src =
                        &bytes[((row - start) * rb) as usize..((piece_hi - start) * rb) as usize];
                    p.buf[((row - ulo) * rb) as usize..((piece_hi - ulo) * rb) as usize]
                        .copy_from_slice(src);
                    for f in &mut p.filled[(row - ulo) as usize..(piece_hi - ulo) as usize] {
                        p.n_filled += u64::from(!*f);
                        *f = true;
                    }
                    if p.n_filled == uhi - ulo {
                        ready.push((ulo, pending.remove(&unit).unwrap().buf));
                    }
                    row = piece_hi;
                }
            }
        }
        if full_lo < full_hi {
            let off = ((full_lo - start) * rb) as usize;
            self.handle.write_rows(
                full_lo,
                &bytes[off..off + ((full_hi - full_lo) * rb) as usize],
            )?;
        }
        for (lo, buf) in ready {
            self.handle.write_rows(lo, &buf)?;
        }
        Ok(())
    }

    /// Write every buffered row of partly written units (their other rows keep what is on disk).
    pub fn flush(&self) -> Result<()> {
        let drained: Vec<(u64, Pending)> = self.pending.lock().unwrap().drain().collect();
        let rb = self.handle.row_bytes();
        for (unit, p) in drained {
            let ulo = self.unit_span(unit).0;
            let mut i = 0;
            while i < p.filled.len() {
                if !p.filled[i] {
                    i += 1;
                    continue;
                }
                let j = i + p.filled[i..].iter().take_while(|&&f| f).count();
                self.handle
                    .write_rows(ulo + i as u64, &p.buf[i * rb..j * rb])?;
                i = j;
            }
        }
        Ok(())
    }

    /// Rows waiting in memory.
    pub fn pending_rows(&self) -> u64 {
        self.pending
            .lock()
            .unwrap()
            .values()
            .map(|p| p.n_filled)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::store::{ArraySpec, Store};
    use serde_json::Map;

    #[test]
    fn blocks_in_any_order_land_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path().join("s.zarr"), Map::new(), false).unwrap();
        let spec = ArraySpec {
            shape: vec![50, 2],
            dtype: DType::UInt8,
            chunk_rows: 4,
            shard_rows: Some(8),
            compression: crate::store::Compression::Zstd(1),
        };
        let w = RowWriter::new(s.create_array("x", &spec).unwrap());
        let data: Vec<u8> = (0..100).map(|v| v as u8).collect();
        for (lo, hi) in [(30, 50), (0, 3), (3, 21), (21, 25)] {
            w.write(lo, &data[lo as usize * 2..hi as usize * 2])
                .unwrap();
        }
        assert_eq!(w.pending_rows(), 3); // rows 24, 30, 31 wait: their shard lacks 25..30
        w.flush().unwrap();
        assert_eq!(w.pending_rows(), 0);
        w.write(25, &data[50..60]).unwrap();
        w.flush().unwrap();
        let mut out = vec![0u8; 100];
        w.handle().read_range_into(0, 50, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
