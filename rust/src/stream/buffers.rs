//! Batch buffers handed back by the consumer, kept for the next batches of a stream.

/// Batch buffers handed back by the consumer and kept for reuse, at most this many bytes per stream.
pub const POOL_MAX_BYTES: usize = 256 << 20;

/// Batch buffers to reuse: already faulted in, and never zeroed again (every byte of a batch
/// buffer is written by the gather before the batch is handed out).
#[derive(Default)]
pub struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer of `len` bytes (old contents, or zeros when new).
    pub fn take(&self, len: usize) -> Vec<u8> {
        if let Ok(mut free) = self.free.lock() {
            if let Some(i) = free
                .iter()
                .position(|b| b.capacity() >= len && b.capacity() <= 2 * len.max(1))
            {
                let mut buf = free.swap_remove(i);
                buf.resize(len, 0);
                return buf;
            }
        }
        vec![0u8; len]
    }

    /// Keep `buf` for a later batch (unless the pool is full; never waits for the lock, so a
    /// buffer dropped in a forked child whose parent held the lock is simply freed).
    pub fn give(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.try_lock() {
            let held: usize = free.iter().map(Vec::capacity).sum();
            if buf.capacity() > 0 && held + buf.capacity() <= POOL_MAX_BYTES {
                free.push(buf);
            }
        }
    }
}
