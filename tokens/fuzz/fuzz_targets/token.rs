#![no_main]
//! Arbitrary bytes as SYN / SYN-ACK / ACK payloads, labels and key tokens:
//! every outcome must be a value, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    trireme_tokens::fuzzing::exercise(data);
});
