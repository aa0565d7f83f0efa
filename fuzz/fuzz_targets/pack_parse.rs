//! Packs from arbitrary bytes: `PackIndex::parse`, `LoadedPack::parse` and
//! `decode_frame` of every frame found, into a 64 KiB page, as a whole page (layer 0)
//! and as a delta (layer 1). Never a panic, a hang or an unbounded allocation.
//!
//! Frames carry a CRC-32, which the fuzzer cannot forge: the frames of a pack that
//! parses are decoded again from a copy whose CRCs are made to match, so the payloads
//! (zstd, deltas) reach the codecs. That copy is also re-packed frame by frame as
//! compaction does (`PackBuilder::push_frame`) and must parse to the same frames.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wasnap::delta::Encoding;
use wasnap::store::manifest::PackRef;
use wasnap::store::pack::{FRAME_HEADER_LEN, PackBuilder, PackIndex, decode_frame};
use wasnap::store::recent::LoadedPack;

const PAGE: usize = 64 * 1024;

/// Decode every frame of `pack`, each on layer 0 and then on layer 1, over one page.
fn decode_all(pack: &[u8], index: &PackIndex) {
    let mut dctx = wasnap::delta::decompressor().expect("zstd context");
    let mut scratch = Vec::new();
    let mut page: Vec<u8> = (0..PAGE).map(|i| (i * 31 >> 3) as u8).collect();
    for (i, range) in index.frames.iter().enumerate() {
        let frame = index
            .frame(pack, i as u32)
            .expect("a frame the index lists lies in the pack");
        assert_eq!(frame.len(), range.len());
        for layer in [0, 1] {
            let _ = decode_frame(frame, layer, &mut page, &mut scratch, &mut dctx, "fuzz");
            assert_eq!(page.len(), PAGE);
        }
    }
    assert!(index.frame(pack, index.frames.len() as u32).is_none());
}

fuzz_target!(|data: &[u8]| {
    let Ok(index) = PackIndex::parse(data, "fuzz") else {
        return;
    };
    decode_all(data, &index);

    // The pack as the manifest that names it would describe it, and one that does not.
    let pack_ref = PackRef {
        generation: index.generation,
        writer_id: index.writer_id,
        frames: index.frames.len() as u32,
        bytes: data.len() as u64,
    };
    let bytes = Bytes::copy_from_slice(data);
    let loaded =
        LoadedPack::parse(&pack_ref, bytes.clone()).expect("a pack that parses loads as itself");
    for i in 0..pack_ref.frames {
        assert_eq!(loaded.frame(i), index.frame(data, i));
    }
    let other = PackRef {
        frames: pack_ref.frames.wrapping_add(1),
        ..pack_ref.clone()
    };
    assert!(LoadedPack::parse(&other, bytes).is_err());

    // The same frames with matching CRCs: the payloads reach the decoders.
    let mut fixed = data.to_vec();
    for range in &index.frames {
        let frame = &mut fixed[range.clone()];
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame[8..]); // the encoding byte and the payload
        let crc = crc.finalize();
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(frame.len() >= FRAME_HEADER_LEN);
    }
    let fixed_index = PackIndex::parse(&fixed, "fuzz fixed").expect("CRCs are not parsed");
    decode_all(&fixed, &fixed_index);

    // Compaction copies frames byte for byte into a new pack.
    // A frame of an unknown encoding is refused (never carried into a new pack); every
    // other frame copies, and a pack of copies is the same bytes as the original.
    let mut builder = PackBuilder::new(index.generation, &index.writer_id, fixed.len());
    for i in 0..pack_ref.frames {
        let frame = fixed_index.frame(&fixed, i).expect("frame");
        let known = Encoding::from_byte(frame[8]).is_some();
        match builder.push_frame(frame, "fuzz fixed") {
            Ok(n) => assert!(known && n == i, "copied frame {i} as {n}"),
            Err(e) => {
                assert!(!known, "a frame with a matching CRC is refused: {e:#}");
                return;
            }
        }
    }
    let repacked = builder.finish();
    let repacked_index = PackIndex::parse(&repacked, "fuzz repacked").expect("a built pack parses");
    assert_eq!(repacked_index.frames, fixed_index.frames);
    assert!(
        repacked == fixed,
        "a pack of copied frames differs from the original"
    );
});
