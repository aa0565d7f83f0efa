//! `Manifest::decode` on arbitrary bytes: never a panic, a hang or an unbounded
//! allocation; a manifest that decodes re-encodes to one that decodes to the same value.
//!
//! The input is decoded as it is, and again with its last four bytes replaced by the
//! CRC-32 of the rest, so the fuzzer also gets past the checksum to the header's other
//! fields (version, flags, lengths, the zstd body) and the body decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasnap::store::manifest::Manifest;

fn decode_and_round_trip(bytes: &[u8]) {
    let Ok(manifest) = Manifest::decode(bytes, "fuzz") else {
        return;
    };
    let encoded = manifest
        .encode()
        .expect("a decoded manifest must encode again");
    let again = Manifest::decode(&encoded, "fuzz re-encoded")
        .expect("a re-encoded manifest must decode again");
    assert_eq!(again, manifest, "manifest does not survive a round trip");
    // The helpers a restore and retention call on a decoded manifest.
    let _ = manifest.memory_bytes();
    let _ = manifest.stored_pages();
    let _ = manifest.live_frames();
}

fuzz_target!(|data: &[u8]| {
    decode_and_round_trip(data);
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let (covered, crc) = fixed.split_at_mut(data.len() - 4);
        crc.copy_from_slice(&crc32fast::hash(covered).to_le_bytes());
        decode_and_round_trip(&fixed);
    }
});
