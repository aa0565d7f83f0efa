//! Pack objects: the page versions one checkpoint wrote, each compressed on its own and
//! framed with a CRC-32, so a restore decodes any frame independently and compaction can
//! copy a frame into another pack byte for byte. Frames are numbered in order; manifests
//! refer to them by (pack, frame number). The byte layout is specified in `docs/FORMAT.md`.

use std::ops::Range;

use anyhow::{Context, Result, bail};

use super::codec::{Put, Reader};
use super::sparse;

pub const PACK_MAGIC: &[u8; 8] = b"WASNAPPK";
pub const PACK_VERSION: u16 = 2;
/// magic, version, flags, frame count, generation, writer id.
pub const PACK_HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8 + 16;
/// payload length, CRC-32 of encoding and payload, encoding.
pub const FRAME_HEADER_LEN: usize = 4 + 4 + 1;

/// zstd level for whole pages and prefix deltas. Compression runs beside the guest, not
/// in its pause, so it can afford level 3: 9 % smaller than level 1 on the word-count
/// heaps, at nearly the same throughput. Level 9 measured 4 % smaller again but cut the
/// records/s of small fast guests by up to 3x on two cores, through back-pressure.
pub const ZSTD_LEVEL: i32 = 3;

/// zstd level for XOR and subtraction deltas: mostly zeros, which level 1 already codes
/// best (higher levels measured slightly larger).
pub const DELTA_ZSTD_LEVEL: i32 = 1;

/// What a frame holds, written in its header. A manifest's layer 0 holds whole pages; a
/// layer k > 0 holds deltas, each against the version the layers below it rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The whole page, zstd-compressed.
    Full = 1,
    /// The page XOR its previous version, zstd-compressed: bytes changed in place.
    XorDelta = 2,
    /// The page zstd-compressed with its previous version as a reference prefix: bytes
    /// that moved (a hash table resized, a heap compacted) are found where they were.
    PrefixDelta = 3,
    /// The page minus its previous version, 32-bit little-endian word by word (wrapping),
    /// zstd-compressed: counters that grew become small numbers, where XOR scatters bits.
    /// Read, no longer written: `SparseDelta` codes the same differences smaller.
    SubDelta = 4,
    /// Only the 32-bit words that changed, as gaps and differences (`sparse`),
    /// zstd-compressed: scattered small changes cost a byte or two each.
    SparseDelta = 5,
}

impl Encoding {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Full),
            2 => Some(Self::XorDelta),
            3 => Some(Self::PrefixDelta),
            4 => Some(Self::SubDelta),
            5 => Some(Self::SparseDelta),
            _ => None,
        }
    }

    pub fn is_delta(self) -> bool {
        self != Self::Full
    }

    /// The most a payload of this encoding decompresses to, for a page of `page_len`
    /// bytes: the page itself, or a sparse stream, which can be longer.
    fn max_decoded_len(self, page_len: usize) -> usize {
        match self {
            Self::SparseDelta => sparse::max_stream_len(page_len),
            _ => page_len,
        }
    }
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
            bail!("{what} is not a wasnap pack (bad magic)");
        }
        let version = r.u16()?;
        if version != PACK_VERSION {
            bail!(
                "{what} has pack format version {version}; this wasnap reads version {PACK_VERSION}"
            );
        }
        let flags = r.u16()?;
        if flags != 0 {
            bail!("{what} uses unknown flags {flags:#x} (written by a newer wasnap?)");
        }
        let count = r.u32()? as usize;
        let generation = r.u64()?;
        let writer_id = r.array()?;
        if count.saturating_mul(FRAME_HEADER_LEN) > r.remaining() {
            bail!("{what} is corrupt: {count} frames cannot fit in it");
        }
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            let start = pack.len() - r.remaining();
            let payload_len = r.u32()? as usize;
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

/// The encoding and payload of a whole frame, after checking its length and CRC.
fn frame_payload<'a>(frame: &'a [u8], what: &str) -> Result<(Encoding, &'a [u8])> {
    let Some((header, payload)) = frame.split_at_checked(FRAME_HEADER_LEN) else {
        bail!("{what} is corrupt: a frame is truncated");
    };
    let payload_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if payload_len != payload.len() {
        bail!("{what} is corrupt: a frame has a bad length");
    }
    if frame_crc(header[8], payload) != crc {
        bail!("{what} is corrupt: CRC mismatch in a frame");
    }
    let encoding = Encoding::from_byte(header[8]).with_context(|| {
        format!(
            "{what}: a frame has unknown encoding {} (written by a newer wasnap?)",
            header[8]
        )
    })?;
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
    let (encoding, payload) = frame_payload(frame, what)?;
    if encoding.is_delta() != (layer > 0) {
        bail!("{what} is corrupt: a {encoding:?} frame on layer {layer}");
    }
    let capacity = encoding.max_decoded_len(dst.len());
    if scratch.len() < capacity {
        scratch.resize(capacity, 0);
    }
    let out = &mut scratch[..capacity];
    let n = match encoding {
        Encoding::PrefixDelta => decompressor.decompress_using_dict(&mut *out, payload, dst),
        Encoding::Full | Encoding::XorDelta | Encoding::SubDelta | Encoding::SparseDelta => {
            decompressor.decompress(&mut *out, payload)
        }
    }
    .map_err(zstd_error)
    .with_context(|| format!("{what} is corrupt: a frame does not decompress"))?;
    let out = &out[..n];
    if encoding != Encoding::SparseDelta && n != dst.len() {
        bail!(
            "{what} is corrupt: a frame holds {n} bytes, expected {}",
            dst.len()
        );
    }
    match encoding {
        Encoding::XorDelta => xor_into(dst, out),
        Encoding::SubDelta => add_words(dst, out),
        Encoding::SparseDelta => sparse::apply(dst, out, what)?,
        Encoding::Full | Encoding::PrefixDelta => dst.copy_from_slice(out),
    }
    Ok(())
}

/// Whether `base` can be a prefix: zstd would parse one that starts with its dictionary
/// magic as a dictionary instead of as raw content.
pub fn prefix_usable(base: &[u8]) -> bool {
    !base.starts_with(&0xEC30_A437u32.to_le_bytes())
}

fn zstd_error(code: usize) -> anyhow::Error {
    anyhow::anyhow!("zstd: {}", zstd::zstd_safe::get_error_name(code))
}

/// Compress `page` as a frame payload of `encoding`, given its previous version `base`
/// (unused for `Full`). `scratch` is scratch space. A `base` that starts with zstd's
/// dictionary magic cannot serve as a raw prefix: use [`prefix_usable`] first.
pub fn encode_payload(
    cctx: &mut zstd::zstd_safe::CCtx<'_>,
    encoding: Encoding,
    page: &[u8],
    base: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Vec<u8>> {
    let longest = encoding.max_decoded_len(page.len());
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(longest));
    let level = |cctx: &mut zstd::zstd_safe::CCtx<'_>, level| {
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
            .map_err(zstd_error)
    };
    let written = match encoding {
        Encoding::Full => {
            level(cctx, ZSTD_LEVEL)?;
            cctx.compress2(&mut out, page)
        }
        Encoding::XorDelta | Encoding::SubDelta => {
            scratch.clear();
            scratch.extend_from_slice(page);
            if encoding == Encoding::XorDelta {
                xor_into(scratch, base);
            } else {
                sub_words(scratch, base);
            }
            level(cctx, DELTA_ZSTD_LEVEL)?;
            cctx.compress2(&mut out, scratch)
        }
        Encoding::SparseDelta => {
            sparse::encode(page, base, scratch);
            level(cctx, DELTA_ZSTD_LEVEL)?;
            cctx.compress2(&mut out, scratch)
        }
        // The previous version as a raw-content dictionary: zstd references it in place.
        Encoding::PrefixDelta => cctx.compress_using_dict(&mut out, page, base, ZSTD_LEVEL),
    };
    written
        .map_err(zstd_error)
        .context("cannot compress a page")?;
    Ok(out)
}

/// A compression context for [`encode_payload`].
pub fn compressor<'a>() -> Result<zstd::zstd_safe::CCtx<'a>> {
    zstd::zstd_safe::CCtx::try_create().context("cannot create a zstd context")
}

/// A decompression context.
pub fn decompressor<'a>() -> Result<zstd::zstd_safe::DCtx<'a>> {
    zstd::zstd_safe::DCtx::try_create().context("cannot create a zstd context")
}

/// `dst -= src`, as little-endian 32-bit words (wrapping); a tail of under 4 bytes byte
/// by byte. The inverse of [`add_words`].
pub fn sub_words(dst: &mut [u8], src: &[u8]) {
    word_op(dst, src, u32::wrapping_sub, u8::wrapping_sub)
}

/// `dst += src`, as little-endian 32-bit words (wrapping); the inverse of [`sub_words`].
pub fn add_words(dst: &mut [u8], src: &[u8]) {
    word_op(dst, src, u32::wrapping_add, u8::wrapping_add)
}

fn word_op(dst: &mut [u8], src: &[u8], word: fn(u32, u32) -> u32, byte: fn(u8, u8) -> u8) {
    let mut d = dst.chunks_exact_mut(4);
    let mut s = src.chunks_exact(4);
    for (d, s) in (&mut d).zip(&mut s) {
        let x = word(
            u32::from_le_bytes(d.try_into().expect("4 bytes")),
            u32::from_le_bytes(s.try_into().expect("4 bytes")),
        );
        d.copy_from_slice(&x.to_le_bytes());
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = byte(*d, *s);
    }
}

/// `dst ^= src`, a word at a time.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let x = u64::from_ne_bytes(d.try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(s.try_into().expect("8 bytes"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d ^= s;
    }
}

/// `len` bytes of xorshift noise from `seed` (incompressible test data).
#[cfg(test)]
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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
        let mut dctx = decompressor().unwrap();
        let frames = PackIndex::parse(pack, "pack")?;
        let frame = frames.frame(pack, index).context("no such frame")?;
        let mut scratch = vec![0; out.len()];
        decode_frame(frame, layer, out, &mut scratch, &mut dctx, "pack")
    }

    /// A pack of `(encoding, page, base)` frames.
    fn build(frames: &[(Encoding, &[u8], &[u8])]) -> Vec<u8> {
        let mut builder = PackBuilder::new(7, &[3; 16], 0);
        let mut cctx = compressor().unwrap();
        let mut xor = Vec::new();
        for (encoding, page, base) in frames {
            let payload = encode_payload(&mut cctx, *encoding, page, base, &mut xor).unwrap();
            builder.push_payload(*encoding, &payload).unwrap();
        }
        builder.finish()
    }

    /// `new` as a delta over `old` in each of `encodings`, in one pack: checks that every
    /// frame rebuilds `new` exactly, and returns the frames' sizes.
    fn delta_sizes(encodings: &[Encoding], new: &[u8], old: &[u8]) -> Vec<usize> {
        let frames: Vec<_> = encodings.iter().map(|e| (*e, new, old)).collect();
        let pack = build(&frames);
        for (frame, encoding) in encodings.iter().enumerate() {
            let mut out = old.to_vec();
            decode(&pack, frame as u32, 1, &mut out).unwrap();
            assert!(out == new, "a {encoding:?} frame does not rebuild the page");
        }
        let index = PackIndex::parse(&pack, "pack").unwrap();
        index.frames.iter().map(|f| f.len()).collect()
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
        delta_sizes(&every_delta, &pages[1], &pages[0]);
        // Incompressible bytes that moved by 1000: a prefix delta finds them, XOR cannot.
        let noise = noise(0x9E37_79B9_7F4A_7C15, 65536);
        let moved: Vec<u8> = noise[1000..]
            .iter()
            .chain(&noise[..1000])
            .copied()
            .collect();
        let sizes = delta_sizes(&[Encoding::PrefixDelta, Encoding::XorDelta], &moved, &noise);
        let (prefix, xor) = (sizes[0], sizes[1]);
        assert!(
            prefix < 2000 && xor > 60_000,
            "prefix {prefix} B, xor {xor} B"
        );
    }

    #[test]
    fn subtraction_deltas_make_grown_counters_small_and_undo_exactly() {
        // Counters (u32 LE) that each grew by 1, on a page with a 3-byte tail.
        let old: Vec<u8> = (0..16_385u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
            .take(65_539)
            .collect();
        let mut new = old.clone();
        for word in new.chunks_exact_mut(4) {
            let grown = u32::from_le_bytes(word.try_into().unwrap()).wrapping_add(1);
            word.copy_from_slice(&grown.to_le_bytes());
        }
        new[65_538] = new[65_538].wrapping_add(7);
        let mut delta = new.clone();
        sub_words(&mut delta, &old);
        assert!(delta.chunks_exact(4).all(|w| w == [1, 0, 0, 0]));
        assert_eq!(&delta[65_536..], &[0, 0, 7]);
        let mut back = old.clone();
        add_words(&mut back, &delta);
        assert_eq!(back, new);

        let sizes = delta_sizes(&[Encoding::SubDelta, Encoding::XorDelta], &new, &old);
        let (sub, xor) = (sizes[0], sizes[1]);
        assert!(sub * 10 < xor, "subtraction {sub} B, XOR {xor} B");
    }

    #[test]
    fn scattered_counters_go_sparse_at_a_fraction_of_a_dense_delta() {
        // A histogram page: 250 of 16 384 counters bumped, spread over the page.
        let old: Vec<u8> = (0..16_384u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) % 50).to_le_bytes())
            .collect();
        let mut new = old.clone();
        for k in 0..250usize {
            let at = (k * 2_654_435_761usize) % 16_384 * 4;
            new[at] += 1;
        }
        let kinds = [
            Encoding::SparseDelta,
            Encoding::SubDelta,
            Encoding::XorDelta,
        ];
        let sizes = delta_sizes(&kinds, &new, &old);
        assert!(
            sizes[0] * 2 < sizes[1].min(sizes[2]),
            "sparse, subtraction, XOR: {sizes:?} B"
        );
        // A sparse stream for a page of another length does not decode.
        let pack = build(&[(Encoding::SparseDelta, &new, &old)]);
        let mut short = vec![0; 4096];
        assert!(decode(&pack, 0, 1, &mut short).is_err());
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

    #[test]
    fn a_page_that_looks_like_a_zstd_dictionary_is_no_prefix() {
        let mut base = vec![0u8; 65536];
        base[..4].copy_from_slice(&0xEC30_A437u32.to_le_bytes());
        assert!(!prefix_usable(&base));
        assert!(prefix_usable(&[0u8; 65536]));
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
