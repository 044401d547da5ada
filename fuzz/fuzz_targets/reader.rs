//! Coverage-guided fuzzing of the store reader: the fuzzer's bytes are the case (a store layout,
//! its corruptions, the stream; see rust/fuzzing/case.rs). A panic in any thread, a misbehaving
//! read (wrong values, an error that does not name the array and chunk) or a hang is a finding.
#![no_main]

#[path = "../../rust/fuzzing/case.rs"]
mod case;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let case = case::Case::from_bytes(data);
    if let Err(problem) = case::run(&case) {
        panic!("{problem}\ncase: {case:?}");
    }
});
