//! Pack objects: the page versions one checkpoint wrote, each compressed on its own and
//! framed with a CRC-32, so a restore decodes any frame independently and compaction can
//! copy a frame into another pack byte for byte. Frames are numbered in order; manifests
//! refer to them by (pack, frame number). The byte layout is specified in `docs/FORMAT.md`.

use std::ops::Range;

use anyhow::{Context, Result};

use crate::codec::{Put, Reader};
use crate::delta::{self, Encoding};
use crate::error::corrupt;

pub const PACK_MAGIC: &[u8; 8] = b"WASNAPPK";
pub const PACK_VERSION: u16 = 2;
/// magic, version, flags, frame count, generation, writer id.
pub const PACK_HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8 + 16;
/// payload length, CRC-32 of encoding and payload, encoding.
pub const FRAME_HEADER_LEN: usize = 4 + 4 + 1;

/// The largest payload a frame may have: a page compressed by zstd stays below a page
/// plus its small worst-case overhead; twice a page leaves room for any encoding.
pub const MAX_FRAME_PAYLOAD: usize = 2 * crate::snapshot::pages::PAGE_SIZE;

/// The most bytes a pack of `frames` frames can have.
pub fn max_pack_bytes(frames: u32) -> u64 {
    PACK_HEADER_LEN as u64 + u64::from(frames) * (FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD) as u64
}

/// Builds a pack frame by frame.
pub struct PackBuilder {
    bytes: Vec<u8>,
    frames: u32,
}

impl PackBuilder {
    pub fn new(generation: u64, writer_id: &[u8; 16], capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(PACK_HEADER_LEN + capacity);
        bytes.extend_from_slice(PACK_MAGIC);
        bytes.put_u16(PACK_VERSION);
        bytes.put_u16(0); // flags
        bytes.put_u32(0); // frame count, set by `finish`
        bytes.put_u64(generation);
        bytes.extend_from_slice(writer_id);
        Self { bytes, frames: 0 }
    }

    /// Append a frame around a compressed payload; returns its frame number.
    pub fn push_payload(&mut self, encoding: Encoding, payload: &[u8]) -> Result<u32> {
        if payload.len() > MAX_FRAME_PAYLOAD {
            anyhow::bail!(
                "a compressed page of {} bytes is too large for a frame",
                payload.len()
            );
        }
        let len = u32::try_from(payload.len()).context("compressed page too large")?;
        self.bytes.put_u32(len);
        self.bytes.put_u32(frame_crc(encoding as u8, payload));
        self.bytes.put_u8(encoding as u8);
        self.bytes.extend_from_slice(payload);
        self.frames += 1;
        Ok(self.frames - 1)
    }

    /// Append a whole frame (header and payload) copied from another pack; its CRC is
    /// checked first, so compaction never carries damage into a new pack.
    pub fn push_frame(&mut self, frame: &[u8], what: &str) -> Result<u32> {
        frame_payload(frame, what)?;
        self.bytes.extend_from_slice(frame);
        self.frames += 1;
        Ok(self.frames - 1)
    }

    #[cfg(test)]
    pub fn frames(&self) -> u32 {
        self.frames
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.bytes[12..16].copy_from_slice(&self.frames.to_le_bytes());
        self.bytes
    }
}

/// A pack's header, checked, and where each of its frames lies.
pub struct PackIndex {
    pub generation: u64,
    pub writer_id: [u8; 16],
    pub frames: Vec<Range<usize>>,
}

impl PackIndex {
    /// Check the header and walk the frame headers; `what` names the object in errors.
    /// Payload CRCs are checked when a frame is decoded or copied.
    pub fn parse(pack: &[u8], what: &str) -> Result<Self> {
        let mut r = Reader::new(pack, what);
        if &r.array::<8>()? != PACK_MAGIC {
            return Err(corrupt!("{what} is not a wasnap pack (bad magic)"));
        }
        let version = r.u16()?;
        if version != PACK_VERSION {
            return Err(corrupt!(
                "{what} has pack format version {version}; this wasnap reads version {PACK_VERSION}"
            ));
        }
        let flags = r.u16()?;
        if flags != 0 {
            return Err(corrupt!(
                "{what} uses unknown flags {flags:#x} (written by a newer wasnap?)"
            ));
        }
        let count = r.u32()? as usize;
        let generation = r.u64()?;
        let writer_id = r.array()?;
        if count.saturating_mul(FRAME_HEADER_LEN) > r.remaining() {
            return Err(corrupt!(
                "{what} is corrupt: {count} frames cannot fit in it"
            ));
        }
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            let start = pack.len() - r.remaining();
            let payload_len = r.u32()? as usize;
            if payload_len > MAX_FRAME_PAYLOAD {
                return Err(corrupt!(
                    "{what} is corrupt: a frame claims {payload_len} bytes"
                ));
            }
            r.u32()?; // CRC
            r.u8()?; // encoding
            r.bytes(payload_len)?;
            frames.push(start..start + FRAME_HEADER_LEN + payload_len);
        }
        r.finish()?;
        Ok(Self {
            generation,
            writer_id,
            frames,
        })
    }

    /// The bytes of frame `index` (header included).
    pub fn frame<'a>(&self, pack: &'a [u8], index: u32) -> Option<&'a [u8]> {
        let range = self.frames.get(index as usize)?;
        pack.get(range.clone())
    }
}

fn frame_crc(encoding: u8, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[encoding]);
    crc.update(payload);
    crc.finalize()
}

/// A frame's encoding byte, unchecked: a hint to skip a frame before checking it (a
/// frame is used only after [`frame_payload`] has checked it).
pub fn frame_encoding_hint(frame: &[u8]) -> Option<Encoding> {
    Encoding::from_byte(*frame.get(8)?)
}

/// The encoding and payload of a whole frame, after checking its length and CRC.
pub fn frame_payload<'a>(frame: &'a [u8], what: &str) -> Result<(Encoding, &'a [u8])> {
    let Some((header, payload)) = frame.split_at_checked(FRAME_HEADER_LEN) else {
        return Err(corrupt!("{what} is corrupt: a frame is truncated"));
    };
    let payload_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if payload_len != payload.len() {
        return Err(corrupt!("{what} is corrupt: a frame has a bad length"));
    }
    if frame_crc(header[8], payload) != crc {
        return Err(corrupt!("{what} is corrupt: CRC mismatch in a frame"));
    }
    let encoding = Encoding::from_byte(header[8]).ok_or_else(|| {
        corrupt!(
            "{what}: a frame has unknown encoding {} (written by a newer wasnap?)",
            header[8]
        )
    })?;
    Ok((encoding, payload))
}

/// The encoding and payload of a frame that stands on `layer` of a page's chain, after
/// checking its CRC and that it fits the layer (a whole page on 0, a delta above).
pub fn layer_payload<'a>(
    frame: &'a [u8],
    layer: usize,
    what: &str,
) -> Result<(Encoding, &'a [u8])> {
    let (encoding, payload) = frame_payload(frame, what)?;
    if encoding == Encoding::KvChunk || encoding.is_delta() != (layer > 0) {
        return Err(corrupt!(
            "{what} is corrupt: a {encoding:?} frame on layer {layer}"
        ));
    }
    Ok((encoding, payload))
}

/// Decode one frame into `dst` (exactly a page's length): a whole page if `layer` is 0,
/// else a delta applied to what `dst` holds (the previous version). `scratch` is scratch
/// space, grown as needed.
pub fn decode_frame(
    frame: &[u8],
    layer: usize,
    dst: &mut [u8],
    scratch: &mut Vec<u8>,
    decompressor: &mut zstd::zstd_safe::DCtx<'_>,
    what: &str,
) -> Result<()> {
    let (encoding, payload) = layer_payload(frame, layer, what)?;
    delta::decode_payload(encoding, payload, dst, scratch, decompressor, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_pages() -> Vec<Vec<u8>> {
        (0..20u8)
            .map(|i| {
                (0..65536u32)
                    .map(|j| (j.wrapping_mul(i as u32 + 1) >> 5) as u8)
                    .collect()
            })
            .collect()
    }

    /// Decode frame `index` of `pack` on `layer` over `out` (the previous version).
    fn decode(pack: &[u8], index: u32, layer: usize, out: &mut [u8]) -> Result<()> {
        let mut dctx = delta::decompressor().unwrap();
        let frames = PackIndex::parse(pack, "pack")?;
        let frame = frames.frame(pack, index).context("no such frame")?;
        let mut scratch = vec![0; out.len()];
        decode_frame(frame, layer, out, &mut scratch, &mut dctx, "pack")
    }

    /// A pack of `(encoding, page, base)` frames.
    fn build(frames: &[(Encoding, &[u8], &[u8])]) -> Vec<u8> {
        let mut builder = PackBuilder::new(7, &[3; 16], 0);
        let mut cctx = delta::compressor().unwrap();
        let mut xor = Vec::new();
        for (encoding, page, base) in frames {
            let payload =
                delta::encode_payload(&mut cctx, *encoding, page, base, &mut xor).unwrap();
            builder.push_payload(*encoding, &payload).unwrap();
        }
        builder.finish()
    }

    /// `new` as a delta over `old` in each of `encodings`, in one pack: checks that every
    /// frame rebuilds `new` exactly.
    fn assert_deltas_rebuild(encodings: &[Encoding], new: &[u8], old: &[u8]) {
        let frames: Vec<_> = encodings.iter().map(|e| (*e, new, old)).collect();
        let pack = build(&frames);
        for (frame, encoding) in encodings.iter().enumerate() {
            let mut out = old.to_vec();
            decode(&pack, frame as u32, 1, &mut out).unwrap();
            assert!(out == new, "a {encoding:?} frame does not rebuild the page");
        }
    }

    fn whole(pages: &[Vec<u8>]) -> Vec<u8> {
        let frames: Vec<_> = pages
            .iter()
            .map(|p| (Encoding::Full, p.as_slice(), &[][..]))
            .collect();
        build(&frames)
    }

    #[test]
    fn whole_pages_and_every_kind_of_delta_round_trip() {
        let pages = sample_pages();
        let pack = whole(&pages);
        let index = PackIndex::parse(&pack, "pack").unwrap();
        assert_eq!((index.generation, index.writer_id), (7, [3; 16]));
        assert_eq!(index.frames.len(), pages.len());
        for (i, page) in pages.iter().enumerate() {
            let mut out = vec![0; page.len()];
            decode(&pack, i as u32, 0, &mut out).unwrap();
            assert_eq!(&out, page);
        }
        // Page 1 as deltas on top of page 0.
        let every_delta = [
            Encoding::XorDelta,
            Encoding::PrefixDelta,
            Encoding::SubDelta,
            Encoding::SparseDelta,
        ];
        assert_deltas_rebuild(&every_delta, &pages[1], &pages[0]);
    }

    #[test]
    fn a_frame_on_the_wrong_layer_is_refused() {
        let pages = sample_pages();
        let pack = whole(&pages[..1]);
        let mut out = vec![0; 65536];
        assert!(
            decode(&pack, 0, 1, &mut out).is_err(),
            "a whole page as a delta"
        );
        let pack = build(&[(Encoding::XorDelta, &pages[1], &pages[0])]);
        assert!(
            decode(&pack, 0, 0, &mut out).is_err(),
            "a delta as a whole page"
        );
    }

    #[test]
    fn copied_frames_stay_valid_and_damaged_ones_are_refused() {
        let pages = sample_pages();
        let pack = whole(&pages[..3]);
        let index = PackIndex::parse(&pack, "pack").unwrap();
        let mut copy = PackBuilder::new(8, &[4; 16], 0);
        assert_eq!(
            copy.push_frame(index.frame(&pack, 2).unwrap(), "pack")
                .unwrap(),
            0
        );
        let mut damaged = index.frame(&pack, 1).unwrap().to_vec();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(copy.push_frame(&damaged, "pack").is_err());
        let copy = copy.finish();
        let mut out = vec![0; 65536];
        decode(&copy, 0, 0, &mut out).unwrap();
        assert_eq!(out, pages[2]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let page: Vec<u8> = (0..65536u32).map(|j| (j / 7) as u8).collect();
        let pack = whole(std::slice::from_ref(&page));
        let mut out = vec![0; page.len()];
        for i in 0..pack.len() {
            // Generation and writer id are checked against the manifest, not here.
            if (16..PACK_HEADER_LEN).contains(&i) {
                continue;
            }
            let mut bad = pack.clone();
            bad[i] ^= 0x01;
            assert!(
                decode(&bad, 0, 0, &mut out).is_err(),
                "flip at byte {i} went undetected"
            );
        }
        for len in 0..pack.len() {
            assert!(PackIndex::parse(&pack[..len], "pack").is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packs_never_panic(
            pack in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            index in 0u32..4,
            layer in 0usize..3,
        ) {
            let mut out = vec![0; 65536];
            let _ = decode(&pack, index, layer, &mut out);
        }
    }

    #[test]
    fn a_bad_header_or_a_missing_frame_is_an_error_not_a_panic() {
        let mut pack = whole(&[vec![1u8; 65536]]);
        let mut out = vec![0; 65536];
        assert!(decode(&pack, 1, 0, &mut out).is_err());
        pack[0] = b'X';
        assert!(
            PackIndex::parse(&pack, "pack")
                .err()
                .unwrap()
                .to_string()
                .contains("not a wasnap pack")
        );
    }
}
