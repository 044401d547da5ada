//! Default chunking: rows along axis 0, ~1 MiB chunks, grouped into ~64 MiB shards when many.

/// Uncompressed bytes per chunk that the default layout aims at.
pub const CHUNK_TARGET_BYTES: u64 = 1 << 20;
/// Uncompressed bytes per shard that the default layout aims at.
pub const SHARD_TARGET_BYTES: u64 = 64 << 20;
/// Arrays with fewer chunks than this are not sharded.
pub const SHARD_MIN_CHUNKS: u64 = 16;

/// Rows per chunk for rows of `row_bytes` bytes, never more than the array has (but at least 1).
pub fn default_chunk_rows(n_rows: u64, row_bytes: u64) -> u64 {
    (CHUNK_TARGET_BYTES / row_bytes.max(1)).clamp(1, n_rows.max(1))
}

/// Rows per shard (a multiple of `chunk_rows`), or None when sharding would not help.
pub fn default_shard_rows(n_rows: u64, row_bytes: u64, chunk_rows: u64) -> Option<u64> {
    let n_chunks = n_rows.div_ceil(chunk_rows.max(1));
    if n_chunks < SHARD_MIN_CHUNKS {
        return None;
    }
    let per_shard = (SHARD_TARGET_BYTES / (chunk_rows * row_bytes.max(1))).max(2);
    Some(chunk_rows * per_shard.min(n_chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arrays_are_one_chunk_and_unsharded() {
        assert_eq!(default_chunk_rows(10, 784), 10);
        assert_eq!(default_shard_rows(10, 784, 10), None);
        assert_eq!(default_chunk_rows(0, 784), 1);
    }

    #[test]
    fn large_arrays_are_sharded_in_whole_chunks() {
        let c = default_chunk_rows(50_000, 784);
        assert_eq!(c, (1 << 20) / 784);
        let s = default_shard_rows(50_000, 784, c).unwrap();
        assert_eq!(s % c, 0);
        assert!(s * 784 <= SHARD_TARGET_BYTES);
    }

    #[test]
    fn huge_rows_get_one_row_chunks() {
        assert_eq!(default_chunk_rows(100, 8 << 20), 1);
    }
}
