//! `Manifest::decode` on arbitrary bytes: never a panic, a hang or an unbounded
//! allocation; a manifest that decodes re-encodes to one that decodes to the same value.
//!
//! The input is decoded as it is, and again with its last four bytes replaced by the
//! CRC-32 of the rest, so the fuzzer also gets past the checksum to the header's other
//! fields (version, flags, lengths, the zstd body) and the body decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "manifest_round_trip.rs"]
mod manifest_round_trip;
use manifest_round_trip::decode_and_round_trip;

fuzz_target!(|data: &[u8]| {
    decode_and_round_trip(data);
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let (covered, crc) = fixed.split_at_mut(data.len() - 4);
        crc.copy_from_slice(&crc32fast::hash(covered).to_le_bytes());
        decode_and_round_trip(&fixed);
    }
});
