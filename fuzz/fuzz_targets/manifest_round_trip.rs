//! Shared by the manifest targets: what must hold of any manifest that decodes.

use wasnap::store::manifest::Manifest;

/// Decode `bytes`; a manifest that decodes re-encodes to one that decodes to the same
/// value, and the helpers a restore and retention call on it do not panic.
pub fn decode_and_round_trip(bytes: &[u8]) {
    let Ok(manifest) = Manifest::decode(bytes, "fuzz") else {
        return;
    };
    let encoded = manifest
        .encode()
        .expect("a decoded manifest must encode again");
    let again = Manifest::decode(&encoded, "fuzz re-encoded")
        .expect("a re-encoded manifest must decode again");
    assert_eq!(again, manifest, "manifest does not survive a round trip");
    let _ = manifest.memory_bytes();
    let _ = manifest.stored_pages();
    let _ = manifest.live_frames();
}
