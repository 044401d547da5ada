//! The store reader (store and stream) against corrupt chunk and shard bytes, truncated and
//! deleted files and broken metadata: seeded cases of `rust/fuzzing/case.rs`, each in its own
//! thread with a deadline, panics caught in every thread. Never a panic, a crash or a hang; every
//! failed read a clear error naming the array and the chunk.
//!
//! `cargo test --test fuzz_reader` runs a bounded number of cases from a fixed seed. Environment:
//! `DBCORE_FUZZ_CASES` (cases to run), `DBCORE_FUZZ_SECONDS` (run for this long instead),
//! `DBCORE_FUZZ_SEED` (first case seed; case i has seed + i). A failure prints the case and the
//! command that reruns it alone; a crash (an abort) leaves the case it ran in
//! `$CARGO_TARGET_TMPDIR/fuzz_reader-last-case`. Every bug found becomes a named case in
//! `regressions`.

#[path = "../fuzzing/case.rs"]
mod case;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use _native::dtype::DType;
use case::{ArrayCase, Case, IndexEntry, JsonEdit, Layout, Mutation, Outcome, Pos, Rng};
use serde_json::json;

/// Cases of a plain `cargo test` (about 20 s in a debug build on 2 cores, stores in /dev/shm).
const DEFAULT_CASES: u64 = 700;
/// Bytes drawn per case (more than any case reads).
const CASE_BYTES: usize = 256;
/// A case still running after this long hangs.
const DEADLINE: Duration = Duration::from_secs(20);

/// Panics of any thread (stream and decode threads included) since the last case started.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// One test at a time, so a panic is blamed on the case that caused it.
static SERIAL: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serial() -> MutexGuard<'static, ()> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            print(info);
            let thread = std::thread::current();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            let name = thread.name().unwrap_or("?");
            lock(&PANICS).push(format!("thread '{name}' panicked at {at}: {msg}"));
        }))
    });
    lock(&SERIAL)
}

/// How a case went wrong; `hung` leaves its thread behind.
struct Failure {
    why: String,
    hung: bool,
}

/// Run `case` in its own thread, within the deadline, catching panics of every thread.
fn check(case: &Case) -> Result<Outcome, Failure> {
    lock(&PANICS).clear();
    let (tx, rx) = mpsc::channel();
    let c = case.clone();
    std::thread::Builder::new()
        .name("fuzz-case".into())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(|| case::run(&c))));
        })
        .expect("cannot start a case thread");
    let result = rx.recv_timeout(DEADLINE);
    let panics = std::mem::take(&mut *lock(&PANICS));
    let fail = |why: String| Failure { why, hung: false };
    match result {
        Err(RecvTimeoutError::Timeout) => Err(Failure {
            why: format!("hung: still running after {DEADLINE:?}"),
            hung: true,
        }),
        Err(RecvTimeoutError::Disconnected) | Ok(Err(_)) => Err(fail(panics.join("\n"))),
        Ok(Ok(_)) if !panics.is_empty() => Err(fail(panics.join("\n"))),
        Ok(Ok(Err(problem))) => Err(fail(problem)),
        Ok(Ok(Ok(outcome))) => Ok(outcome),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[test]
fn fuzz_reader() {
    let _serial = serial();
    let seed = env_u64("DBCORE_FUZZ_SEED").unwrap_or(0);
    let seconds = env_u64("DBCORE_FUZZ_SECONDS");
    let cases = env_u64("DBCORE_FUZZ_CASES").unwrap_or(if seconds.is_some() {
        u64::MAX
    } else {
        DEFAULT_CASES
    });
    let until = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    // The case running now, for a crash that takes the whole process down.
    let last = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_reader-last-case");
    let t0 = Instant::now();
    let (mut ran, mut refused, mut failures) = (0u64, 0u64, Vec::new());
    while ran < cases && until.is_none_or(|u| Instant::now() < u) {
        let case_seed = seed.wrapping_add(ran);
        let case = Case::from_bytes(&Rng(case_seed).bytes(CASE_BYTES));
        let _ = std::fs::write(&last, format!("case seed {case_seed}: {case:?}\n"));
        ran += 1;
        match check(&case) {
            Ok(outcome) => {
                if cases == 1 {
                    eprintln!("case seed {case_seed}: {case:?}\n{outcome:#?}");
                }
                refused += u64::from(!outcome.errors().is_empty());
            }
            Err(f) => {
                failures.push(format!(
                    "case seed {case_seed}: {}\n  case: {case:?}\n  rerun it: \
                     DBCORE_FUZZ_SEED={case_seed} DBCORE_FUZZ_CASES=1 cargo test --test \
                     fuzz_reader fuzz_reader",
                    f.why
                ));
                if f.hung || failures.len() >= 10 {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&last);
    eprintln!(
        "fuzz_reader: {ran} cases from seed {seed} in {:.1} s: {} read clean, {refused} refused, \
         {} failed",
        t0.elapsed().as_secs_f64(),
        ran - refused - failures.len() as u64,
        failures.len()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// What a named case must end in, beyond passing the checks of every case.
#[derive(Debug, PartialEq)]
enum Expect {
    Clean,
    Refused,
}

/// Cases found by the fuzzer, and hand-picked ones; the bug each one caught, if any, in brackets.
fn named_cases() -> Vec<(&'static str, Case, Expect)> {
    use Expect::*;
    use Layout::*;
    let raw1 = Raw { chunk_rows: 1 };
    let zstd = Zstd { chunk_rows: 4 };
    let raw_sharded = RawSharded {
        chunk_rows: 2,
        shard_chunks: 3,
    };
    let zstd_sharded = ZstdSharded {
        chunk_rows: 2,
        shard_chunks: 3,
    };
    let json = |array, edit| Mutation::Json { array, edit };
    let sharding = |inner| {
        json!([{"name": "sharding_indexed", "configuration": {
            "chunk_shape": inner, "codecs": [{"name": "bytes"}],
            "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}], "index_location": "end"}}])
    };
    let truncate = |len| Mutation::Truncate {
        array: 0,
        file: 1,
        len,
    };
    let index = |value| Mutation::ShardIndex {
        array: 0,
        file: 0,
        entry: 1,
        value,
    };
    let unrecorded = json(None, JsonEdit::Remove("/attributes/dbcore/arrays"));
    vec![
        // [zstd and codec errors named the array, not the chunk]
        (
            "truncated shard index",
            Case::simple(raw_sharded, truncate(Pos::End(10))),
            Refused,
        ),
        (
            "truncated zstd shard index",
            Case::simple(zstd_sharded, truncate(Pos::End(3))),
            Refused,
        ),
        (
            "zero-length zstd chunk",
            Case::simple(zstd, truncate(Pos::Start(0))),
            Refused,
        ),
        (
            "zero-length raw chunk",
            Case::simple(raw1, truncate(Pos::Start(0))),
            Refused,
        ),
        (
            "zero-length shard",
            Case::simple(raw_sharded, truncate(Pos::Start(0))),
            Refused,
        ),
        (
            "flipped zstd byte",
            Case::simple(
                zstd,
                Mutation::Flip {
                    array: 1,
                    file: 0,
                    edits: vec![(Pos::Start(20), 0x10)],
                },
            ),
            Refused,
        ),
        // [a whole-shard read failed, every inner chunk alone read fine: named no chunk]
        (
            "empty inner chunk in a shard index, checksum intact",
            Case::simple(raw_sharded, index(IndexEntry::Set(16, 0))),
            Refused,
        ),
        // [zarrs sliced the shard by offset + length wrapped past 2^64: a panic]
        (
            "shard index entry past the end, checksum intact",
            Case::simple(raw_sharded, index(IndexEntry::Set(u64::MAX - 3, 24))),
            Refused,
        ),
        // [zarrs allocated the index of 2^60 inner chunks a huge shard shape implies: an abort]
        (
            "huge shard, its index read from a short file",
            Case::simple(
                zstd,
                json(
                    Some(0),
                    JsonEdit::Add("/chunk_grid/configuration/chunk_shape/0", -(1 << 40)),
                ),
            )
            .and(json(
                Some(0),
                JsonEdit::Set("/codecs", sharding(json!([3, 1]))),
            )),
            Refused,
        ),
        // [row count times row bytes overflowed checking an output buffer: a panic]
        (
            "shape changed to huge",
            Case::simple(
                zstd,
                json(Some(0), JsonEdit::Set("/shape", json!([1u64 << 62, 3]))),
            ),
            Refused,
        ),
        // [the row size overflowed opening the array: a panic]
        (
            "row size overflows",
            Case::simple(
                raw1,
                json(Some(0), JsonEdit::Set("/shape", json!([24, 1u64 << 62]))),
            ),
            Refused,
        ),
        // [zarrs' chunk arithmetic overflowed: a panic, or slicing by wrapped offsets]
        (
            "chunk shape overflows",
            Case::simple(
                zstd,
                json(
                    Some(0),
                    JsonEdit::Set("/chunk_grid/configuration/chunk_shape/1", json!(u64::MAX)),
                ),
            ),
            Refused,
        ),
        // [zarrs opened it, then panicked on the subchunk grid; an index out of bounds here]
        (
            "inner chunk shape of the wrong dimensionality",
            Case::simple(
                raw_sharded,
                json(
                    Some(1),
                    JsonEdit::Remove("/codecs/0/configuration/chunk_shape/0"),
                ),
            ),
            Refused,
        ),
        // [the stream would allocate an epoch's order (or a batch) of 2^40 entries: an abort]
        (
            "huge shape, not recorded by the store",
            Case::simple(
                raw1,
                json(Some(0), JsonEdit::Set("/shape", json!([1u64 << 40, 3]))),
            )
            .and(json(Some(1), JsonEdit::Set("/shape", json!([1u64 << 40]))))
            .and(unrecorded.clone()),
            Refused,
        ),
        (
            "rows of 2^40 elements, not recorded by the store",
            Case::simple(
                raw_sharded,
                json(Some(0), JsonEdit::Set("/shape/1", json!(1u64 << 40))),
            )
            .and(unrecorded.clone()),
            Refused,
        ),
        // [listing the arrays named no array]
        (
            "garbage array zarr.json",
            Case::simple(
                zstd,
                json(Some(0), JsonEdit::Replace(b"\x00{garbage".to_vec())),
            ),
            Refused,
        ),
        (
            "zarr_format 2 in an array's zarr.json",
            Case {
                rows: 17,
                arrays: vec![
                    ArrayCase {
                        dtype: DType::Int64,
                        inner: vec![1],
                        layout: raw1,
                    },
                    ArrayCase {
                        dtype: DType::Int64,
                        inner: vec![],
                        layout: ZstdSharded {
                            chunk_rows: 1,
                            shard_chunks: 2,
                        },
                    },
                ],
                ..Case::simple(raw1, json(Some(0), JsonEdit::Set("/zarr_format", json!(2))))
            },
            Refused,
        ),
        (
            "truncated array zarr.json",
            Case::simple(raw_sharded, json(Some(1), JsonEdit::Cut(Pos::End(20)))),
            Refused,
        ),
        // hand-picked, no bug
        (
            "missing chunk of a raw array reads as zeros",
            Case::simple(raw1, Mutation::Delete { array: 0, file: 3 }),
            Clean,
        ),
        (
            "deleted chunk and dropped record",
            Case::simple(zstd, Mutation::Delete { array: 1, file: 0 }).and(unrecorded),
            Clean,
        ),
        (
            "chunk shape 0",
            Case::simple(
                raw1,
                json(
                    Some(0),
                    JsonEdit::Set("/chunk_grid/configuration/chunk_shape/0", json!(0)),
                ),
            ),
            Refused,
        ),
        (
            "data type changed",
            Case::simple(
                raw1,
                json(Some(1), JsonEdit::Set("/data_type", json!("float64"))),
            ),
            Refused,
        ),
        (
            "invalid UTF-8 in the group zarr.json",
            Case::simple(zstd, json(None, JsonEdit::InvalidUtf8(Pos::Start(3)))),
            Refused,
        ),
        (
            "dbcore attribute not an object",
            Case::simple(
                zstd,
                json(None, JsonEdit::Set("/attributes/dbcore", json!(5))),
            ),
            Refused,
        ),
    ]
}

#[test]
fn regressions() {
    let _serial = serial();
    let mut failures = Vec::new();
    for (name, case, expect) in named_cases() {
        match check(&case) {
            Err(f) => failures.push(format!("{name}: {}\n  case: {case:?}", f.why)),
            Ok(outcome) => {
                eprintln!("{name}: {outcome:#?}");
                let got = if outcome.errors().is_empty() {
                    Expect::Clean
                } else {
                    Expect::Refused
                };
                if got != expect {
                    failures.push(format!(
                        "{name}: expected {expect:?}, got {outcome:?}\n  case: {case:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}
