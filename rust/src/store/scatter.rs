//! The output slots of a gather (`Scatter`), checked disjoint so that threads may fill them.

use unsafe_cell_slice::UnsafeCellSlice;

use crate::error::{Error, Result};

/// Output slots of a gather: slot i is `len` bytes at `slots[i] = (piece, byte offset)`.
/// Slots are checked disjoint and in bounds, so gathers may fill them from several threads.
pub struct Scatter<'a> {
    pieces: Vec<UnsafeCellSlice<'a, u8>>,
    pub(super) slots: Vec<(usize, usize)>,
    pub(super) len: usize,
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
    pub(super) unsafe fn slot(&self, i: usize) -> &mut [u8] {
        let (p, off) = self.slots[i];
        self.pieces[p].index_mut(off..off + self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_refuses_overlapping_slots() {
        let mut a = vec![0u8; 16];
        assert!(Scatter::new(vec![&mut a], vec![(0, 0), (0, 4)], 8).is_err());
        let mut a = vec![0u8; 16];
        assert!(Scatter::new(vec![&mut a], vec![(0, 12)], 8).is_err());
        let mut a = vec![0u8; 16];
        assert!(Scatter::new(vec![&mut a], vec![(0, 8), (0, 0)], 8).is_ok());
    }
}
