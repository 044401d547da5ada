//! One fuzz case of the store reader: a small valid store, one or two corruptions of its files
//! (chunk and shard bytes, truncation, deletion, `zarr.json` of an array or of the group), then
//! every read entry point over the result. The seeded driver (`rust/tests/fuzz_reader.rs`) and the
//! coverage-guided one (`fuzz/fuzz_targets/reader.rs`) both include this file.
//!
//! A case passes when nothing panics and every read either succeeds or fails with an error that
//! names the store, the corrupted array and, for corrupted chunk or shard bytes, the chunk.
//! Reads that succeed must agree with each other, and with the written values wherever the
//! corruption is detectable (zstd chunks carry a checksum, raw chunks none: see store/raw.rs).

#![allow(dead_code)] // each driver uses part of it

use std::path::{Path, PathBuf};

use _native::dtype::DType;
use _native::error::Error;
use _native::store::{ArrayHandle, ArraySpec, Compression, FileMaps, Scatter, Store};
use _native::stream::{Mode, Selection, Spec, Stream};
use serde_json::{json, Value};

/// Array names, by index.
pub const NAMES: [&str; 3] = ["x", "y", "z"];

/// Whole-array reads are skipped past this many bytes (a corrupt shape may claim exabytes).
const READ_LIMIT: u64 = 1 << 24;

/// SplitMix64: the seeded source of every random choice of the drivers.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Choices read from a byte string (zeros once it runs out), so a fuzzer's input maps to a case.
pub struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// A number in 0..n from as few bytes as cover the range.
    fn below(&mut self, n: u64) -> u64 {
        let (mut v, mut span) = (0u64, 1u64);
        while span < n {
            v = (v << 8) | u64::from(self.byte());
            span = span.saturating_mul(256);
        }
        v % n.max(1)
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, _| (v << 8) | u64::from(self.byte()))
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }
}

/// How an array's chunks are laid out on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Zstd { chunk_rows: u64 },
    Raw { chunk_rows: u64 },
    RawSharded { chunk_rows: u64, shard_chunks: u64 },
    ZstdSharded { chunk_rows: u64, shard_chunks: u64 },
}

impl Layout {
    fn compressed(self) -> bool {
        matches!(self, Layout::Zstd { .. } | Layout::ZstdSharded { .. })
    }

    /// Inner chunks per shard, when sharded.
    fn shard_chunks(self) -> Option<u64> {
        match self {
            Layout::RawSharded { shard_chunks, .. } | Layout::ZstdSharded { shard_chunks, .. } => {
                Some(shard_chunks)
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ArrayCase {
    pub dtype: DType,
    /// Shape past the rows.
    pub inner: Vec<u64>,
    pub layout: Layout,
}

/// A byte position in a file of any length: from its start or from its end, wrapped.
#[derive(Clone, Copy, Debug)]
pub enum Pos {
    Start(u64),
    End(u64),
}

impl Pos {
    /// A byte in 0..len (len > 0).
    fn at(self, len: u64) -> u64 {
        match self {
            Pos::Start(o) => o % len,
            Pos::End(o) => len - 1 - o % len,
        }
    }

    /// A length in 0..=len.
    fn cut(self, len: u64) -> u64 {
        match self {
            Pos::Start(o) => o % (len + 1),
            Pos::End(o) => len - o % (len + 1),
        }
    }
}

/// A new (offset, length) for an entry of a shard index.
#[derive(Clone, Copy, Debug)]
pub enum IndexEntry {
    Set(u64, u64),
    /// That of another entry (so the data of another inner chunk).
    CopyOf(u64),
    /// The offset moved by this many bytes.
    Shift(i64),
}

/// An edit of a `zarr.json`; pointers are JSON pointers.
#[derive(Clone, Debug)]
pub enum JsonEdit {
    Remove(&'static str),
    Set(&'static str, Value),
    /// Add to the number at the pointer.
    Add(&'static str, i64),
    /// Truncate the file.
    Cut(Pos),
    /// Overwrite one byte with 0xff.
    InvalidUtf8(Pos),
    Replace(Vec<u8>),
    Delete,
}

/// A corruption; `file` indexes the array's chunk (or shard) files in sorted order, wrapped.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// XOR bytes of a chunk or shard file.
    Flip {
        array: usize,
        file: usize,
        edits: Vec<(Pos, u8)>,
    },
    Truncate {
        array: usize,
        file: usize,
        len: Pos,
    },
    Delete {
        array: usize,
        file: usize,
    },
    Append {
        array: usize,
        file: usize,
        bytes: Vec<u8>,
    },
    /// Rewrite an entry of a shard's index, its crc32c recomputed (so it passes the checksum).
    ShardIndex {
        array: usize,
        file: usize,
        entry: u64,
        value: IndexEntry,
    },
    /// Edit the `zarr.json` of an array, or of the group (None).
    Json {
        array: Option<usize>,
        edit: JsonEdit,
    },
}

impl Mutation {
    fn array(&self) -> Option<usize> {
        match self {
            Mutation::Flip { array, .. }
            | Mutation::Truncate { array, .. }
            | Mutation::Delete { array, .. }
            | Mutation::Append { array, .. }
            | Mutation::ShardIndex { array, .. } => Some(*array),
            Mutation::Json { array, .. } => *array,
        }
    }

    /// True for a change to chunk or shard bytes (not metadata).
    fn of_chunks(&self) -> bool {
        !matches!(self, Mutation::Json { .. })
    }
}

#[derive(Clone, Debug)]
pub struct StreamCase {
    pub batch_size: usize,
    pub mode: Mode,
    pub world_size: usize,
    pub rank: usize,
    pub drop_last: bool,
    pub window_chunks: Option<u64>,
    pub prefetch: usize,
    pub epoch: u64,
}

/// A store to build, how to corrupt it and how to stream it.
#[derive(Clone, Debug)]
pub struct Case {
    pub rows: u64,
    pub arrays: Vec<ArrayCase>,
    /// Rows lo..hi of every array are zeros: chunks of zeros alone are not stored.
    pub zero_rows: (u64, u64),
    pub mutations: Vec<Mutation>,
    pub stream: StreamCase,
    /// Seeds the data and the rows read.
    pub seed: u64,
}

const ARRAY_POINTERS: [&str; 32] = [
    "/shape",
    "/shape/0",
    "/shape/1",
    "/data_type",
    "/chunk_grid",
    "/chunk_grid/name",
    "/chunk_grid/configuration/chunk_shape",
    "/chunk_grid/configuration/chunk_shape/0",
    "/chunk_grid/configuration/chunk_shape/1",
    "/chunk_key_encoding/name",
    "/chunk_key_encoding/configuration/separator",
    "/fill_value",
    "/codecs",
    "/codecs/0",
    "/codecs/0/name",
    "/codecs/0/configuration",
    "/codecs/0/configuration/endian",
    "/codecs/0/configuration/chunk_shape",
    "/codecs/0/configuration/chunk_shape/0",
    "/codecs/0/configuration/codecs",
    "/codecs/0/configuration/codecs/0/configuration/endian",
    "/codecs/0/configuration/codecs/1",
    "/codecs/0/configuration/index_codecs",
    "/codecs/0/configuration/index_codecs/1",
    "/codecs/0/configuration/index_location",
    "/codecs/1",
    "/codecs/1/configuration/checksum",
    "/zarr_format",
    "/node_type",
    "/attributes",
    "/dimension_names",
    "/storage_transformers",
];

const GROUP_POINTERS: [&str; 13] = [
    "/attributes",
    "/attributes/dbcore",
    "/attributes/dbcore/format",
    "/attributes/dbcore/complete",
    "/attributes/dbcore/arrays",
    "/attributes/dbcore/arrays/x",
    "/attributes/dbcore/arrays/x/shape",
    "/attributes/dbcore/arrays/x/shape/0",
    "/attributes/dbcore/arrays/y/dtype",
    "/attributes/dbcore/arrays/w",
    "/node_type",
    "/zarr_format",
    "/consolidated_metadata",
];

/// Values worth writing into metadata: wrong types, zero, huge, plausible but wrong.
fn value(k: u64) -> Value {
    let sharding = |inner: Value| {
        json!([{"name": "sharding_indexed", "configuration": {
            "chunk_shape": inner, "codecs": [{"name": "bytes"}],
            "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}], "index_location": "end"}}])
    };
    match k {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(1u64 << 62),
        4 => json!(u64::MAX),
        5 => json!(2.5),
        6 => json!("x"),
        7 => Value::Null,
        8 => json!(true),
        9 => json!([]),
        10 => json!([0]),
        11 => json!([1]),
        12 => json!([1u64 << 62, 3]),
        13 => json!([16, 1u64 << 62]),
        14 => json!([u64::MAX]),
        15 => json!([0, 3]),
        16 => json!([1, 1, 1]),
        17 => json!({}),
        18 => json!("float64"),
        19 => json!("int8"),
        20 => json!("bfloat16"),
        21 => json!("uint8"),
        22 => json!("float16"),
        23 => json!("big"),
        24 => json!("start"),
        25 => json!("v2"),
        26 => json!("."),
        27 => json!([{"name": "bytes"}]),
        28 => json!([{"name": "bytes", "configuration": {"endian": "big"}}]),
        29 => json!([{"name": "zstd", "configuration": {"level": 1, "checksum": true}}]),
        30 => json!([{"name": "bytes"}, {"name": "crc32c"}]),
        31 => sharding(json!([1, 1])),
        32 => sharding(json!([3, 1])),
        33 => json!({"name": "crc32c"}),
        34 => json!([1u64 << 40, 1]),
        35 => json!("NaN"),
        36 => json!([1, 2]),
        37 => json!(2),
        38 => json!(3),
        39 => json!("array"),
        40 => json!("group"),
        41 => json!({"format": 1, "complete": true}),
        42 => json!({"shape": [1u64 << 62], "dtype": "uint8"}),
        43 => json!([1u64 << 33, 2, 2]),
        44 => json!({"name": "regular", "configuration": {"chunk_shape": [0]}}),
        _ => json!([{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 1}}]),
    }
}
const N_VALUES: u64 = 46;

fn pos(inp: &mut Input) -> Pos {
    if inp.flag() {
        Pos::End(inp.below(64))
    } else {
        Pos::Start(inp.u64())
    }
}

fn interesting_u64(inp: &mut Input) -> u64 {
    const V: [u64; 10] = [
        0,
        1,
        8,
        16,
        100,
        1 << 32,
        1 << 62,
        u64::MAX - 3,
        u64::MAX,
        u64::MAX - 1,
    ];
    match inp.below(12) {
        10 => inp.u64(),
        11 => inp.below(512),
        i => V[i as usize],
    }
}

fn json_edit(inp: &mut Input, pointers: &[&'static str]) -> JsonEdit {
    let ptr = pointers[inp.below(pointers.len() as u64) as usize];
    match inp.below(9) {
        0 | 1 => JsonEdit::Remove(ptr),
        2..=4 => JsonEdit::Set(ptr, value(inp.below(N_VALUES))),
        5 => {
            const D: [i64; 6] = [1, -1, 2, 1 << 40, -(1 << 40), i64::MAX];
            JsonEdit::Add(ptr, D[inp.below(6) as usize])
        }
        6 => JsonEdit::Cut(pos(inp)),
        7 => JsonEdit::InvalidUtf8(pos(inp)),
        _ => match inp.below(4) {
            0 => JsonEdit::Delete,
            1 => JsonEdit::Replace(Vec::new()),
            2 => JsonEdit::Replace(b"null".to_vec()),
            _ => JsonEdit::Replace((0..inp.below(24)).map(|_| inp.byte()).collect()),
        },
    }
}

fn mutation(inp: &mut Input, n_arrays: usize) -> Mutation {
    let array = inp.below(n_arrays as u64) as usize;
    let file = inp.below(64) as usize;
    match inp.below(11) {
        0 | 1 => Mutation::Flip {
            array,
            file,
            edits: (0..1 + inp.below(4))
                .map(|_| (pos(inp), 1 + inp.below(255) as u8))
                .collect(),
        },
        2 => Mutation::Truncate {
            array,
            file,
            len: pos(inp),
        },
        3 => Mutation::Delete { array, file },
        4 => Mutation::Append {
            array,
            file,
            bytes: (0..1 + inp.below(40)).map(|_| inp.byte()).collect(),
        },
        5 | 6 => Mutation::ShardIndex {
            array,
            file,
            entry: inp.below(8),
            value: match inp.below(3) {
                0 => IndexEntry::Set(interesting_u64(inp), interesting_u64(inp)),
                1 => IndexEntry::CopyOf(inp.below(8)),
                _ => IndexEntry::Shift(inp.below(64) as i64 - 32),
            },
        },
        7 | 8 => Mutation::Json {
            array: Some(array),
            edit: json_edit(inp, &ARRAY_POINTERS),
        },
        _ => Mutation::Json {
            array: None,
            edit: json_edit(inp, &GROUP_POINTERS),
        },
    }
}

impl Case {
    /// The case a byte string stands for (any byte string is one).
    pub fn from_bytes(bytes: &[u8]) -> Case {
        let inp = &mut Input::new(bytes);
        let rows = 16 + inp.below(25);
        let n_arrays = 2 + inp.below(2) as usize;
        const DTYPES: [DType; 4] = [DType::Float16, DType::Float32, DType::UInt8, DType::Int64];
        let arrays = (0..n_arrays)
            .map(|i| {
                let dtype = DTYPES[inp.below(4) as usize];
                let inner = match i {
                    0 => vec![1 + inp.below(4)],
                    1 => vec![],
                    _ => vec![2 + inp.below(2), 1 + inp.below(3)],
                };
                let chunk_rows = if inp.flag() { 1 } else { 1 + inp.below(6) };
                let shard_chunks = 2 + inp.below(3);
                let layout = match inp.below(4) {
                    0 => Layout::Zstd { chunk_rows },
                    1 => Layout::Raw { chunk_rows },
                    2 => Layout::RawSharded {
                        chunk_rows,
                        shard_chunks,
                    },
                    _ => Layout::ZstdSharded {
                        chunk_rows,
                        shard_chunks,
                    },
                };
                ArrayCase {
                    dtype,
                    inner,
                    layout,
                }
            })
            .collect();
        let zero_rows = if inp.below(4) == 0 {
            let lo = inp.below(rows);
            (lo, lo + inp.below(rows - lo + 1))
        } else {
            (0, 0)
        };
        let n_mut = if inp.below(5) == 0 { 2 } else { 1 };
        let mutations = (0..n_mut).map(|_| mutation(inp, n_arrays)).collect();
        let world_size = 1 + inp.below(2) as usize;
        let stream = StreamCase {
            batch_size: 1 + inp.below(9) as usize,
            mode: [Mode::Chunks, Mode::Exact, Mode::Sequential][inp.below(3) as usize],
            world_size,
            rank: inp.below(world_size as u64) as usize,
            drop_last: inp.flag(),
            window_chunks: Some(inp.below(4)).filter(|&w| w > 0),
            prefetch: 1 + inp.below(3) as usize,
            epoch: inp.below(3),
        };
        Case {
            rows,
            arrays,
            zero_rows,
            mutations,
            stream,
            seed: inp.u64(),
        }
    }

    /// Two arrays (`x`: 2-D float32, `y`: 1-D int64) of `layout`, 24 rows, one mutation.
    pub fn simple(layout: Layout, mutation: Mutation) -> Case {
        Case {
            rows: 24,
            arrays: vec![
                ArrayCase {
                    dtype: DType::Float32,
                    inner: vec![3],
                    layout,
                },
                ArrayCase {
                    dtype: DType::Int64,
                    inner: vec![],
                    layout,
                },
            ],
            zero_rows: (0, 0),
            mutations: vec![mutation],
            stream: StreamCase {
                batch_size: 5,
                mode: Mode::Chunks,
                world_size: 1,
                rank: 0,
                drop_last: false,
                window_chunks: None,
                prefetch: 2,
                epoch: 0,
            },
            seed: 1,
        }
    }
}

impl Case {
    /// This case with one more mutation.
    pub fn and(mut self, m: Mutation) -> Case {
        self.mutations.push(m);
        self
    }
}

/// How a case ended: every read succeeded, or some were refused with these errors.
#[derive(Debug)]
pub enum Outcome {
    Clean,
    Refused(Vec<String>),
}

impl Outcome {
    pub fn errors(&self) -> &[String] {
        match self {
            Outcome::Clean => &[],
            Outcome::Refused(e) => e,
        }
    }
}

fn row_bytes(a: &ArrayCase) -> usize {
    a.inner.iter().product::<u64>() as usize * a.dtype.size()
}

/// Build the case's store at `root`; returns the bytes written to each array.
fn build(case: &Case, root: &Path) -> Result<Vec<Vec<u8>>, String> {
    let fail = |e: Error| format!("building the store: {e}");
    let store = Store::create(root, Default::default(), false).map_err(fail)?;
    let mut rng = Rng(case.seed);
    let mut written = Vec::new();
    for (i, a) in case.arrays.iter().enumerate() {
        let (compression, chunk_rows, shard_rows) = match a.layout {
            Layout::Zstd { chunk_rows } => (Compression::Zstd(1), chunk_rows, None),
            Layout::Raw { chunk_rows } => (Compression::None, chunk_rows, None),
            Layout::RawSharded {
                chunk_rows,
                shard_chunks,
            } => (
                Compression::None,
                chunk_rows,
                Some(chunk_rows * shard_chunks),
            ),
            Layout::ZstdSharded {
                chunk_rows,
                shard_chunks,
            } => (
                Compression::Zstd(1),
                chunk_rows,
                Some(chunk_rows * shard_chunks),
            ),
        };
        let spec = ArraySpec {
            shape: [vec![case.rows], a.inner.clone()].concat(),
            dtype: a.dtype,
            chunk_rows,
            shard_rows,
            compression,
        };
        let h = store.create_array(NAMES[i], &spec).map_err(fail)?;
        let rb = row_bytes(a);
        let mut bytes = rng.bytes(case.rows as usize * rb);
        let (lo, hi) = case.zero_rows;
        bytes[lo as usize * rb..hi as usize * rb].fill(0);
        h.write_rows(0, &bytes).map_err(fail)?;
        written.push(bytes);
    }
    store.finalize().map_err(fail)?;
    Ok(written)
}

/// The chunk (or shard) files of array `name`, sorted.
fn chunk_files(root: &Path, name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join(name).join("c"), &mut out);
    out.sort();
    out
}

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Resolve a JSON pointer to its parent and last token.
fn parent<'v>(v: &'v mut Value, ptr: &str) -> Option<(&'v mut Value, String)> {
    let (head, last) = ptr.rsplit_once('/')?;
    Some((v.pointer_mut(head)?, last.to_string()))
}

fn edit_json(bytes: Vec<u8>, edit: &JsonEdit) -> Option<Vec<u8>> {
    let len = bytes.len() as u64;
    let structural = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(&bytes).ok()?;
        f(&mut v);
        serde_json::to_vec_pretty(&v).ok()
    };
    match edit {
        JsonEdit::Remove(ptr) => structural(&|v| {
            if let Some((p, k)) = parent(v, ptr) {
                match p {
                    Value::Object(o) => {
                        o.remove(&k);
                    }
                    Value::Array(a) => {
                        if let Some(i) = k.parse::<usize>().ok().filter(|&i| i < a.len()) {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
            }
        }),
        JsonEdit::Set(ptr, new) => structural(&|v| {
            if let Some((p, k)) = parent(v, ptr) {
                match p {
                    Value::Object(o) => {
                        o.insert(k, new.clone());
                    }
                    Value::Array(a) => {
                        if let Some(slot) = k.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                            *slot = new.clone();
                        }
                    }
                    _ => {}
                }
            }
        }),
        JsonEdit::Add(ptr, d) => structural(&|v| {
            if let Some(n) = v.pointer_mut(ptr) {
                if let Some(u) = n.as_u64() {
                    *n = json!(u.wrapping_add_signed(*d));
                } else if let Some(i) = n.as_i64() {
                    *n = json!(i.wrapping_add(*d));
                }
            }
        }),
        JsonEdit::Cut(p) => Some(bytes[..p.cut(len) as usize].to_vec()),
        JsonEdit::InvalidUtf8(p) => {
            let mut b = bytes;
            if len > 0 {
                b[p.at(len) as usize] = 0xff;
            }
            Some(b)
        }
        JsonEdit::Replace(new) => Some(new.clone()),
        JsonEdit::Delete => None,
    }
}

fn apply(case: &Case, root: &Path, m: &Mutation) -> std::io::Result<()> {
    let pick = |array: usize, file: usize| {
        let files = chunk_files(root, NAMES[array]);
        (!files.is_empty()).then(|| files[file % files.len()].clone())
    };
    match m {
        Mutation::Flip { array, file, edits } => {
            if let Some(p) = pick(*array, *file) {
                let mut b = std::fs::read(&p)?;
                for &(at, x) in edits {
                    if !b.is_empty() {
                        let i = at.at(b.len() as u64) as usize;
                        b[i] ^= x;
                    }
                }
                std::fs::write(&p, b)?;
            }
        }
        Mutation::Truncate { array, file, len } => {
            if let Some(p) = pick(*array, *file) {
                let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                f.set_len(len.cut(f.metadata()?.len()))?;
            }
        }
        Mutation::Delete { array, file } => {
            if let Some(p) = pick(*array, *file) {
                std::fs::remove_file(p)?;
            }
        }
        Mutation::Append { array, file, bytes } => {
            if let Some(p) = pick(*array, *file) {
                let mut b = std::fs::read(&p)?;
                b.extend_from_slice(bytes);
                std::fs::write(&p, b)?;
            }
        }
        Mutation::ShardIndex {
            array,
            file,
            entry,
            value,
        } => {
            let Some(n) = case.arrays[*array].layout.shard_chunks() else {
                return Ok(());
            };
            let Some(p) = pick(*array, *file) else {
                return Ok(());
            };
            let mut b = std::fs::read(&p)?;
            let index = 16 * n as usize;
            if b.len() < index + 4 {
                return Ok(());
            }
            let start = b.len() - index - 4;
            let word = |b: &[u8], i: usize| {
                u64::from_le_bytes(b[start + 8 * i..][..8].try_into().unwrap())
            };
            let e = (*entry % n) as usize;
            let (offset, nbytes) = match *value {
                IndexEntry::Set(o, l) => (o, l),
                IndexEntry::CopyOf(j) => {
                    let j = (j % n) as usize;
                    (word(&b, 2 * j), word(&b, 2 * j + 1))
                }
                IndexEntry::Shift(d) => {
                    (word(&b, 2 * e).wrapping_add_signed(d), word(&b, 2 * e + 1))
                }
            };
            b[start + 16 * e..][..8].copy_from_slice(&offset.to_le_bytes());
            b[start + 16 * e + 8..][..8].copy_from_slice(&nbytes.to_le_bytes());
            let crc = crc32c(&b[start..start + index]);
            b[start + index..].copy_from_slice(&crc.to_le_bytes());
            std::fs::write(&p, b)?;
        }
        Mutation::Json { array, edit } => {
            let dir = match array {
                Some(a) => root.join(NAMES[*a]),
                None => root.to_path_buf(),
            };
            let p = dir.join("zarr.json");
            let Ok(old) = std::fs::read(&p) else {
                return Ok(());
            };
            match edit_json(old, edit) {
                Some(new) => std::fs::write(&p, new)?,
                None => std::fs::remove_file(&p)?,
            }
        }
    }
    Ok(())
}

/// The values of an array: its shape, bytes per row, rows.
#[derive(Clone)]
struct Truth {
    shape: Vec<u64>,
    row_bytes: usize,
    bytes: Vec<u8>,
}

struct Run<'a> {
    case: &'a Case,
    root: PathBuf,
    written: Vec<Vec<u8>>,
    /// Per array: the rows a successful read must return, once known.
    truth: Vec<Option<Truth>>,
    errors: Vec<String>,
    problems: Vec<String>,
    rng: Rng,
}

impl Run<'_> {
    /// Record an error of `step` and check that it names what was corrupted.
    fn refused(&mut self, step: &str, e: &Error, read: bool) {
        let msg = e.to_string();
        let mut bad = Vec::new();
        if !msg.contains(&self.root.display().to_string()) {
            bad.push("does not name the store");
        }
        let group = self.case.mutations.iter().any(|m| m.array().is_none());
        if !group {
            let named: Vec<usize> = (0..self.case.arrays.len())
                .filter(|&a| self.case.mutations.iter().any(|m| m.array() == Some(a)))
                .filter(|&a| msg.contains(&format!("'{}'", NAMES[a])))
                .collect();
            if named.is_empty() {
                bad.push("does not name the corrupted array");
            }
            let chunks_only = |a: usize| {
                self.case
                    .mutations
                    .iter()
                    .filter(|m| m.array() == Some(a))
                    .all(Mutation::of_chunks)
            };
            if !named.is_empty() && named.iter().all(|&a| chunks_only(a)) && !names_chunk(&msg) {
                bad.push("does not name the chunk");
            }
        }
        if read && !matches!(e, Error::Corrupt(_) | Error::Io(_)) {
            bad.push("a failed read is neither corrupt nor io");
        }
        if !bad.is_empty() {
            self.problems.push(format!(
                "{step}: {} ({:?}): {msg}",
                bad.join(", "),
                e.kind()
            ));
        }
        self.errors.push(format!("{step}: {msg}"));
    }

    /// Check a successful read of `out` (row `rows[i]`, bytes `col..` of it in slot i).
    fn check_rows(&mut self, step: &str, a: usize, rows: &[u64], col: usize, out: &[u8]) {
        let Some(truth) = &self.truth[a] else {
            return;
        };
        let rb = truth.row_bytes;
        let len = rb - col;
        for (i, &r) in rows.iter().enumerate() {
            let want = &truth.bytes[r as usize * rb + col..][..len];
            if out[i * len..][..len] != *want {
                self.problems.push(format!(
                    "{step}: array '{}' row {r} differs from {}",
                    NAMES[a],
                    if self.as_written(a) {
                        "what was written"
                    } else {
                        "another read"
                    }
                ));
                return;
            }
        }
    }

    /// Whether a successful read of array `a` returns the values written: yes unless its
    /// metadata was edited, its raw (unchecked) chunks changed or a chunk removed (it reads as
    /// zeros); else it must agree with the other reads.
    fn as_written(&self, a: usize) -> bool {
        let compressed = self.case.arrays[a].layout.compressed();
        self.case.mutations.iter().all(|m| match m {
            _ if m.array() != Some(a) => true,
            Mutation::Flip { .. } | Mutation::Truncate { .. } | Mutation::Append { .. } => {
                compressed
            }
            _ => false,
        })
    }

    fn exercise(&mut self) {
        if let Err(e) = Store::open(&self.root, true) {
            self.refused("Store::open(require_complete)", &e, false);
        }
        let store = match Store::open(&self.root, false) {
            Ok(s) => s,
            Err(e) => return self.refused("Store::open", &e, false),
        };
        let _ = store.attrs();
        let mut names: Vec<String> = NAMES[..self.case.arrays.len()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match store.array_names() {
            Ok(found) => {
                for n in found {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
            Err(e) => self.refused("array_names", &e, false),
        }
        for name in names {
            match store.array(&name) {
                Ok(h) => {
                    if let Some(a) = NAMES.iter().position(|n| *n == name) {
                        self.read_array(a, &h);
                    }
                }
                Err(e) => self.refused(&format!("array({name:?})"), &e, false),
            }
        }
        drop(store);
        self.stream();
    }

    fn read_array(&mut self, a: usize, h: &ArrayHandle) {
        let (shape, rows, rb) = (h.shape(), h.rows(), h.row_bytes());
        let _ = (
            h.dtype(),
            h.layout(),
            h.is_raw(),
            h.unit_rows(),
            h.write_unit_rows(),
        );
        let name = NAMES[a];
        let small = rows.checked_mul(rb as u64).is_some_and(|b| b <= READ_LIMIT);
        let same_shape = shape[1..] == self.case.arrays[a].inner[..]
            && shape[0] == self.case.rows
            && rb == row_bytes(&self.case.arrays[a]);
        if same_shape && self.as_written(a) {
            self.truth[a] = Some(Truth {
                shape: shape.clone(),
                row_bytes: rb,
                bytes: self.written[a].clone(),
            });
        }
        if !small {
            // The buffer a caller could never allocate: refused, not attempted.
            if h.read_range_into(0, rows, &mut [0u8; 8]).is_ok() {
                self.problems.push(format!(
                    "array '{name}' of shape {shape:?} read into 8 bytes"
                ));
            }
        }
        if small {
            let mut out = vec![0u8; rows as usize * rb];
            match h.read_range_into(0, rows, &mut out) {
                Ok(()) => {
                    let all: Vec<u64> = (0..rows).collect();
                    self.check_rows("read_range_into", a, &all, 0, &out);
                    if self.truth[a].is_none() {
                        self.truth[a] = Some(Truth {
                            shape: shape.clone(),
                            row_bytes: rb,
                            bytes: out,
                        });
                    }
                }
                Err(e) => self.refused("read_range_into", &e, true),
            }
        }
        if rows == 0 {
            return;
        }
        let picks: Vec<u64> = if small {
            (0..rows + rows / 2).map(|_| self.rng.below(rows)).collect()
        } else {
            vec![0, rows - 1, rows / 2, self.rng.below(rows), rows - 1]
        };
        if rb == 0 || !small && rb as u64 > READ_LIMIT {
            return;
        }
        let mut out = vec![0u8; picks.len() * rb];
        match h.read_rows_into(&picks, &mut out) {
            Ok(()) => self.check_rows("read_rows_into", a, &picks, 0, &out),
            Err(e) => self.refused("read_rows_into", &e, true),
        }
        // a contiguous run of rows (a plain slice read for compressed arrays)
        let lo = self.rng.below(rows);
        let run: Vec<u64> = (lo..rows.min(lo + 1 + self.rng.below(8))).collect();
        let mut out = vec![0u8; run.len() * rb];
        match h.read_rows_into(&run, &mut out) {
            Ok(()) => self.check_rows("read_rows_into(run)", a, &run, 0, &out),
            Err(e) => self.refused("read_rows_into(run)", &e, true),
        }
        // bytes col.. of each row, through file maps (twice: the second time from the cache)
        let col = self.rng.below(rb as u64) as usize;
        let maps = FileMaps::default();
        for (step, maps) in [
            ("read_rows_scatter", None),
            ("read_rows_scatter_mapped", Some(&maps)),
            ("read_rows_scatter_mapped(again)", Some(&maps)),
        ] {
            let len = rb - col;
            let mut out = vec![0u8; picks.len() * len];
            let slots = (0..picks.len()).map(|i| (0, i * len)).collect();
            let scatter = match Scatter::new(vec![&mut out], slots, len) {
                Ok(s) => s,
                Err(e) => return self.problems.push(format!("Scatter::new: {e}")),
            };
            let res = h.read_rows_scatter_mapped(&picks, col, &scatter, maps);
            drop(scatter);
            match res {
                Ok(()) => self.check_rows(step, a, &picks, col, &out),
                Err(e) => self.refused(step, &e, true),
            }
        }
    }

    fn stream(&mut self) {
        let c = &self.case.stream;
        let spec = Spec {
            arrays: (0..self.case.arrays.len())
                .map(|a| Selection {
                    name: NAMES[a].into(),
                    draw: self.case.arrays[a].inner.len() >= 2,
                })
                .collect(),
            batch_size: c.batch_size,
            mode: c.mode,
            seed: self.case.seed,
            rank: c.rank,
            world_size: c.world_size,
            drop_last: c.drop_last,
            chunk_rows: None,
            window_chunks: c.window_chunks,
            window_bytes: None,
            threads: Some(2),
            prefetch: c.prefetch,
            worker: 0,
            num_workers: 1,
            noise: None,
            windows: None,
        };
        let mut st = match Stream::open(&self.root, spec.clone()) {
            Ok(st) => st,
            Err(e) => return self.refused("Stream::open", &e, false),
        };
        let want_samples = st.num_rank_samples();
        st.start(c.epoch, 0);
        let mut seen = 0;
        while let Some(b) = st.next_batch() {
            let b = match b {
                Ok(b) => b,
                Err(e) => return self.refused("Stream::next_batch", &e, true),
            };
            seen += b.indices.len();
            for (a, sel) in spec.arrays.iter().enumerate() {
                let Some(truth) = &self.truth[a] else {
                    continue;
                };
                let rb = truth.row_bytes;
                let (len, col) = match truth.shape.get(1) {
                    Some(&k) if sel.draw && k > 0 => {
                        (rb / k as usize, (c.epoch % k) as usize * (rb / k as usize))
                    }
                    _ => (rb, 0),
                };
                for (i, &r) in b.indices.iter().enumerate() {
                    let want = &truth.bytes[r as usize * rb + col..][..len];
                    if b.arrays[a][i * len..][..len] != *want {
                        self.problems.push(format!(
                            "stream: array '{}' row {r} differs from the other reads",
                            sel.name
                        ));
                        return;
                    }
                }
            }
        }
        if seen != want_samples {
            self.problems.push(format!(
                "stream: the epoch ended after {seen} of {want_samples} samples without an error"
            ));
        }
    }
}

/// Whether an error message names a chunk: its key or file (`.../c/1/0`) or its index.
pub fn names_chunk(msg: &str) -> bool {
    msg.contains("/c/")
        || msg.match_indices("chunk ").any(|(i, _)| {
            msg[i + 6..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '[')
        })
}

/// Build the case's store, corrupt it, read it every way. Err: the reader misbehaved (a read
/// returned other values than it must, an error does not name what was corrupted, an epoch
/// ended early); panics propagate to the caller.
pub fn run(case: &Case) -> Result<Outcome, String> {
    // in memory where possible: building a store syncs every file it writes
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .map_err(|e| format!("temp dir: {e}"))?;
    let root = dir.path().join("s.zarr");
    let written = build(case, &root)?;
    for m in &case.mutations {
        apply(case, &root, m).map_err(|e| format!("applying {m:?}: {e}"))?;
    }
    let mut run = Run {
        case,
        root,
        truth: vec![None; written.len()],
        written,
        errors: Vec::new(),
        problems: Vec::new(),
        rng: Rng(case.seed ^ 0x5eed),
    };
    run.exercise();
    if !run.problems.is_empty() {
        return Err(run.problems.join("\n"));
    }
    Ok(if run.errors.is_empty() {
        Outcome::Clean
    } else {
        Outcome::Refused(run.errors)
    })
}
