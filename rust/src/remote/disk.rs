//! The persistent local cache of remote objects: files under `DBCORE_CACHE_DIR/objects` (default
//! `~/.cache/dbcore/objects`), at most `DBCORE_CACHE_LIMIT` bytes (default 32 GiB; `0` turns the
//! cache off), the least recently used evicted first.
//!
//! An entry's name carries the object's ETag (`KEY#ETAG`), so a rewritten object is a new entry
//! and a stale one is never served; its size is checked too. Entries appear by rename (complete or
//! absent, shared safely by processes on one machine); a file's modification time is its last use.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use crate::error::{Error, Result};

/// The default size limit.
pub const DEFAULT_LIMIT: u64 = 32 << 30;
/// Partial downloads (`.part`) older than this were left by a killed process.
const STALE_PART_SECS: u64 = 3600;

/// Where the cache lives and how large it may grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub dir: PathBuf,
    /// Bytes; 0: no cache (objects are read remotely, range by range).
    pub limit: u64,
}

impl Settings {
    /// From `DBCORE_CACHE_DIR` and `DBCORE_CACHE_LIMIT` (bytes, or with a K/M/G/T suffix).
    pub fn from_env() -> Result<Settings> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let root = env("DBCORE_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = env("HOME").unwrap_or_else(|| ".".into());
                Path::new(&home).join(".cache").join("dbcore")
            });
        let limit = match env("DBCORE_CACHE_LIMIT") {
            Some(text) => parse_bytes(&text).ok_or_else(|| {
                Error::Invalid(format!(
                    "DBCORE_CACHE_LIMIT={text:?}: expected bytes, e.g. 0, 500M, 20G"
                ))
            })?,
            None => DEFAULT_LIMIT,
        };
        Ok(Settings {
            dir: root.join("objects"),
            limit,
        })
    }
}

/// "20G", "500M", "1.5T", "12345": bytes (binary units).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text
        .trim()
        .trim_end_matches(['B', 'b'])
        .trim_end_matches(['i', 'I']);
    let (num, scale) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1u64 << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        't' | 'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * scale as f64) as u64)
}

/// Settings set by `configure`, which override the environment's.
fn configured() -> &'static Mutex<Option<Settings>> {
    static CELL: OnceLock<Mutex<Option<Settings>>> = OnceLock::new();
    CELL.get_or_init(|| Mutex::new(None))
}

/// Settings for the rest of the process (stores opened afterwards use them).
pub fn configure(settings: Settings) {
    *configured().lock().unwrap() = Some(settings);
}

/// Back to the environment's settings.
pub fn reset() {
    *configured().lock().unwrap() = None;
}

/// The settings in force: those configured, else the environment's as it is now.
pub fn settings() -> Result<Settings> {
    match configured().lock().unwrap().clone() {
        Some(s) => Ok(s),
        None => Settings::from_env(),
    }
}

/// One cache directory with its limit.
#[derive(Debug)]
pub struct DiskCache {
    pub settings: Settings,
    /// Serializes this process's evictions.
    evicting: Mutex<()>,
}

impl DiskCache {
    pub fn new(settings: Settings) -> DiskCache {
        DiskCache {
            settings,
            evicting: Mutex::new(()),
        }
    }

    /// The folder of the remote store `url` (`s3://bucket/prefix` -> `dir/s3/bucket/prefix`).
    pub fn folder(&self, url: &str) -> PathBuf {
        let rest = url.replace("://", "/");
        self.settings.dir.join(rest.trim_matches('/'))
    }

    /// Make room for `bytes` more: evict the least recently used entries (never `keep`) until the
    /// cache holds at most `limit - bytes`. Partial downloads in progress are not counted; those
    /// a killed process left go.
    pub fn make_room(&self, bytes: u64, keep: Option<&Path>) -> Result<()> {
        let _one = self.evicting.lock().unwrap();
        let mut entries = Vec::new();
        walk(&self.settings.dir, &mut entries);
        let now = SystemTime::now();
        let mut total = 0u64;
        let mut kept = Vec::new();
        for (path, size, used) in entries {
            let part = path.extension().is_some_and(|e| e == "part");
            let age = now.duration_since(used).map_or(0, |d| d.as_secs());
            if part && age > STALE_PART_SECS {
                let _ = std::fs::remove_file(&path);
            } else if !part {
                total += size;
                if keep != Some(path.as_path()) {
                    kept.push((used, size, path));
                }
            }
        }
        let budget = self.settings.limit.saturating_sub(bytes);
        if total <= budget {
            return Ok(());
        }
        kept.sort();
        for (_, size, path) in kept {
            if total <= budget {
                break;
            }
            // Another process may have evicted it already; a reader holding it open keeps it.
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
        Ok(())
    }
}

/// Mark an entry as just used.
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Every file under `dir` with its size and modification time.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            walk(&entry.path(), out);
        } else if meta.is_file() {
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((entry.path(), meta.len(), used));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes("12345"), Some(12345));
        assert_eq!(parse_bytes("500M"), Some(500 << 20));
        assert_eq!(parse_bytes("20GiB"), Some(20 << 30));
        assert_eq!(parse_bytes("1.5g"), Some(3 << 29));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1G"), None);
    }

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(Settings {
            dir: dir.path().to_path_buf(),
            limit: 300,
        });
        let folder = cache.folder("s3://b/p.zarr");
        std::fs::create_dir_all(folder.join("x")).unwrap();
        let t0 = SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["a#1", "x/b#2", "c#3"].iter().enumerate() {
            let path = folder.join(name);
            std::fs::write(&path, [0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        touch(&folder.join("a#1")); // now the most recent
        cache.make_room(150, None).unwrap(); // 300 held, 150 allowed: two go
        assert!(folder.join("a#1").exists());
        assert!(!folder.join("x/b#2").exists() && !folder.join("c#3").exists());
        cache.make_room(250, Some(&folder.join("a#1"))).unwrap(); // kept over the limit
        assert!(folder.join("a#1").exists());
    }
}
