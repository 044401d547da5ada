//! Planning a gather: requested rows grouped by the chunk ("read unit") that holds them.
//!
//! Each group is decoded once, over the smallest row range covering its picks, and every pick is
//! copied to its own output slot, so groups can be processed in parallel into one output buffer.

/// The rows wanted from one read unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// First row to decode (absolute).
    pub lo: u64,
    /// One past the last row to decode (absolute).
    pub hi: u64,
    /// (absolute row, output slot) pairs; every output slot occurs in exactly one group.
    pub picks: Vec<(u64, usize)>,
}

/// Group `rows` (any order, repeats allowed) by `unit_rows`-row read units, in unit order.
pub fn plan(rows: &[u64], unit_rows: u64) -> Vec<Group> {
    let unit_rows = unit_rows.max(1);
    let mut order: Vec<(u64, usize)> = rows.iter().copied().zip(0..).collect();
    order.sort_unstable();
    let mut groups: Vec<Group> = Vec::new();
    for (row, slot) in order {
        match groups.last_mut() {
            Some(g) if g.lo / unit_rows == row / unit_rows => {
                g.hi = row + 1;
                g.picks.push((row, slot));
            }
            _ => groups.push(Group {
                lo: row,
                hi: row + 1,
                picks: vec![(row, slot)],
            }),
        }
    }
    groups
}

/// True when `rows` is `start, start+1, ...`: a plain slice read does the job.
pub fn as_range(rows: &[u64]) -> Option<(u64, u64)> {
    let first = *rows.first()?;
    rows.iter()
        .enumerate()
        .all(|(i, &r)| r == first + i as u64)
        .then(|| (first, first + rows.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_unit_with_tight_ranges() {
        let g = plan(&[9, 1, 3, 10, 3], 4);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].lo, g[0].hi), (1, 4));
        assert_eq!(g[0].picks, vec![(1, 1), (3, 2), (3, 4)]);
        assert_eq!((g[1].lo, g[1].hi), (9, 11));
        assert_eq!(g[1].picks, vec![(9, 0), (10, 3)]);
        let mut slots: Vec<usize> = g.iter().flat_map(|g| g.picks.iter().map(|p| p.1)).collect();
        slots.sort_unstable();
        assert_eq!(slots, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn empty_and_ranges() {
        assert!(plan(&[], 8).is_empty());
        assert_eq!(as_range(&[4, 5, 6]), Some((4, 7)));
        assert_eq!(as_range(&[4, 6]), None);
        assert_eq!(as_range(&[]), None);
    }
}
