//! The manifest body decoder behind a valid header: the input (after one control byte)
//! is the body, framed so the length fields and the CRC-32 match, so only the body
//! decoder stands guard (as in the proptest `arbitrary_bytes_behind_a_valid_header_never_panic`
//! in src/store/manifest.rs). Never a panic, a hang or an unbounded allocation; a body
//! that decodes round-trips through `encode`.
//!
//! Header layout: magic `WASNAPMF`, version u16, flags u16 (0 = raw body, 1 = zstd),
//! stored body length u32, raw body length u32, the stored body, CRC-32 of all of it;
//! little-endian. The control byte: bit 0 picks format version 2 (no stream positions)
//! instead of 3, bit 1 stores the body zstd-compressed (flag 1) instead of raw.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasnap::store::manifest::{MANIFEST_MAGIC, MANIFEST_VERSION};

#[path = "manifest_round_trip.rs"]
mod manifest_round_trip;
use manifest_round_trip::decode_and_round_trip;

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    let version: u16 = if control & 1 != 0 {
        2
    } else {
        MANIFEST_VERSION
    };
    let compressed = control & 2 != 0;
    let stored = if compressed {
        zstd::bulk::compress(body, 1).expect("zstd compresses anything")
    } else {
        body.to_vec()
    };
    let mut bytes = Vec::with_capacity(20 + stored.len() + 4);
    bytes.extend_from_slice(MANIFEST_MAGIC);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&u16::from(compressed).to_le_bytes());
    bytes.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&stored);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());

    decode_and_round_trip(&bytes);
});
