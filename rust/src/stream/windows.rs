//! Windows cut at read time from a flat 1-D array (a text store's `tokens`): sample i of an epoch
//! is `tokens[offset .. offset + len]` with
//!
//! ```text
//! offset = min(i * stride + floor(u * stride), rows - len)      (u = 0 without jitter)
//! ```
//!
//! where u is uniform 0 of the counter-based draws keyed by (seed, sample i, `DATA_BLOCK`,
//! draw = epoch): reproducible, resumable, the same on every rank, and independent of the
//! network block (every block of a run sees the same windows). `rows >= len` gives
//! `(rows - len) / stride + 1` samples; no token is stored twice. The Python reference is
//! `dbcore.data.stream.window_offsets`.

use crate::error::{Error, Result};
use crate::philox;

/// The counter's `block` word of data draws: no network block has this index.
pub const DATA_BLOCK: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    pub len: u64,
    pub stride: u64,
    pub jitter: bool,
}

impl Windows {
    /// Samples of an epoch over `rows` tokens; refused when no window fits.
    pub fn count(&self, rows: u64, what: &str) -> Result<u64> {
        if self.len == 0 || self.stride == 0 {
            return Err(Error::Invalid(format!(
                "{what}: windows need len >= 1 and stride >= 1, found len {} stride {}",
                self.len, self.stride
            )));
        }
        if rows < self.len {
            return Err(Error::Invalid(format!(
                "{what}: {rows} tokens, fewer than one window of {}",
                self.len
            )));
        }
        Ok((rows - self.len) / self.stride + 1)
    }

    /// The first token of `sample`'s window in `epoch`.
    pub fn offset(&self, sample: u64, epoch: u64, seed: u64, rows: u64) -> u64 {
        let shift = if self.jitter {
            let u = philox::uniform_for_sigma(sample as u32, seed, DATA_BLOCK, epoch as u32);
            ((u * self.stride as f64) as u64).min(self.stride - 1)
        } else {
            0
        };
        (sample * self.stride + shift).min(rows - self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_stream_and_stay_inside_it() {
        let w = Windows {
            len: 8,
            stride: 4,
            jitter: true,
        };
        let rows = 103;
        let n = w.count(rows, "t").unwrap();
        assert_eq!(n, (103 - 8) / 4 + 1);
        for epoch in 0..3 {
            for s in 0..n {
                let a = w.offset(s, epoch, 5, rows);
                assert!(a + 8 <= rows);
                assert!(a >= s * 4 && (a < s * 4 + 4 || a == rows - 8));
            }
        }
        let shifts: Vec<u64> = (0..n).map(|s| w.offset(s, 0, 5, rows) - s * 4).collect();
        assert!(shifts.iter().any(|&d| d > 0), "jitter moves some windows");
        let fixed = Windows { jitter: false, ..w };
        assert_eq!(
            (fixed.offset(2, 0, 5, rows), fixed.offset(24, 1, 5, rows)),
            (8, 95)
        );
        assert!(w.count(7, "t").is_err());
    }
}
