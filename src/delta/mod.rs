//! Page codecs: how one version of a 64 KiB page is written, whole or as a delta against
//! its previous version, and read back. Each payload is its own zstd frame, so any page
//! decodes on its own; `store::pack` frames payloads with an encoding byte and a CRC.
//!
//! - `Full` (1): the page, zstd level 3;
//! - `XorDelta` (2): the page XOR its previous version (`words`): bytes changed in place;
//! - `PrefixDelta` (3): zstd with the previous version as a raw-content prefix: bytes that
//!   moved (a hash table resized, a heap compacted) are found where they were;
//! - `SubDelta` (4): 32-bit wrapping differences (`words`); read, no longer written;
//! - `SparseDelta` (5): only the changed 32-bit words, as gaps and differences (`sparse`).
//!
//! [`Coder`] holds one thread's zstd contexts and picks the smallest delta for a page.

pub mod sparse;
mod words;

use anyhow::{Context, Result};

pub use words::{add_words, sub_words, xor_into};

/// zstd level for whole pages and prefix deltas. Compression runs beside the guest, not
/// in its pause, so it can afford level 3: 9 % smaller than level 1 on the word-count
/// heaps, at nearly the same throughput. Level 9 measured 4 % smaller again but cut the
/// records/s of small fast guests by up to 3x on two cores, through back-pressure.
pub const ZSTD_LEVEL: i32 = 3;

/// zstd level for XOR, subtraction and sparse deltas: mostly zeros or small numbers,
/// which level 1 already codes best (higher levels measured slightly larger).
pub const DELTA_ZSTD_LEVEL: i32 = 1;

/// Below this, an XOR or sparse delta is not worth a prefix delta's compression (the
/// costliest: zstd indexes the previous version first). Prefix deltas win where bytes
/// moved, and then by far; with bytes changed in place they win a few percent at most.
const PREFIX_WORTH: usize = 8192;

/// Past this share of changed 32-bit words (in percent), a page was rewritten rather than
/// edited (a table rehashed, objects moved, a collector's marks on every object): XOR and
/// sparse deltas then come out a quarter larger than a prefix delta, so only the prefix
/// delta is compressed. On the dirty pages of six guests (120 checkpoints each), this cut
/// the encoding time of the AssemblyScript and C-sessions guests' pages by 41–46 % and
/// wrote at most 0.3 % more bytes (a 25 % threshold: up to 1.2 % more).
const DENSE_PERCENT: usize = 35;

/// How a payload encodes a page, written in its frame's header. A manifest's layer 0
/// holds whole pages; a layer k > 0 holds deltas, each against the version the layers
/// below it rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Full = 1,
    XorDelta = 2,
    PrefixDelta = 3,
    SubDelta = 4,
    SparseDelta = 5,
    /// Not a page: up to `KV_CHUNK_BYTES` of a component's kv run, zstd-compressed
    /// (`snapshot::kv`).
    KvChunk = 6,
}

impl Encoding {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Full),
            2 => Some(Self::XorDelta),
            3 => Some(Self::PrefixDelta),
            4 => Some(Self::SubDelta),
            5 => Some(Self::SparseDelta),
            6 => Some(Self::KvChunk),
            _ => None,
        }
    }

    /// A page delta (every page encoding but a whole page).
    pub fn is_delta(self) -> bool {
        !matches!(self, Self::Full | Self::KvChunk)
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

/// A compression context for [`encode_payload`].
pub fn compressor<'a>() -> Result<zstd::zstd_safe::CCtx<'a>> {
    zstd::zstd_safe::CCtx::try_create().context("cannot create a zstd context")
}

/// A decompression context for [`decode_payload`].
pub fn decompressor<'a>() -> Result<zstd::zstd_safe::DCtx<'a>> {
    zstd::zstd_safe::DCtx::try_create().context("cannot create a zstd context")
}

/// Whether `base` can be a prefix: zstd would parse one that starts with its dictionary
/// magic as a dictionary instead of as raw content.
pub fn prefix_usable(base: &[u8]) -> bool {
    !base.starts_with(&0xEC30_A437u32.to_le_bytes())
}

fn zstd_error(code: usize) -> anyhow::Error {
    anyhow::anyhow!("zstd: {}", zstd::zstd_safe::get_error_name(code))
}

/// Compress `page` as a payload of `encoding`, given its previous version `base` (unused
/// for `Full`). `scratch` is scratch space. A `base` that starts with zstd's dictionary
/// magic cannot serve as a raw prefix: use [`prefix_usable`] first.
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
        // The previous version as a raw-content dictionary, which zstd references in
        // place. Laid out right before the page, so zstd sees one contiguous window instead
        // of an external dictionary: measured 26 % faster on the AssemblyScript guests'
        // pages, for a copy of two pages.
        Encoding::KvChunk => anyhow::bail!("a kv chunk is not a page encoding"),
        Encoding::PrefixDelta => {
            scratch.clear();
            scratch.extend_from_slice(base);
            scratch.extend_from_slice(page);
            let (base, page) = scratch.split_at(base.len());
            cctx.compress_using_dict(&mut out, page, base, ZSTD_LEVEL)
        }
    };
    written
        .map_err(zstd_error)
        .context("cannot compress a page")?;
    Ok(out)
}

/// Decode a payload of `encoding` into `dst` (exactly a page's length): the whole page,
/// or a delta applied to what `dst` holds (the previous version). `scratch` is scratch
/// space, grown as needed; `what` names the object in errors. Any payload that does not
/// describe exactly such a page is a `Corrupt` error, never a panic.
pub fn decode_payload(
    encoding: Encoding,
    payload: &[u8],
    dst: &mut [u8],
    scratch: &mut Vec<u8>,
    dctx: &mut zstd::zstd_safe::DCtx<'_>,
    what: &str,
) -> Result<()> {
    if encoding == Encoding::KvChunk {
        return Err(crate::error::corrupt!(
            "{what} is corrupt: a kv frame where a page belongs"
        ));
    }
    let capacity = encoding.max_decoded_len(dst.len());
    if scratch.len() < capacity {
        scratch.resize(capacity, 0);
    }
    let out = &mut scratch[..capacity];
    let n = match encoding {
        Encoding::PrefixDelta => dctx.decompress_using_dict(&mut *out, payload, dst),
        Encoding::Full
        | Encoding::XorDelta
        | Encoding::SubDelta
        | Encoding::SparseDelta
        | Encoding::KvChunk => dctx.decompress(&mut *out, payload),
    }
    .map_err(|code| {
        crate::error::corrupt!(
            "{what} is corrupt: a frame does not decompress ({})",
            zstd_error(code)
        )
    })?;
    let out = &out[..n];
    if encoding != Encoding::SparseDelta && n != dst.len() {
        return Err(crate::error::corrupt!(
            "{what} is corrupt: a frame holds {n} bytes, expected {}",
            dst.len()
        ));
    }
    match encoding {
        Encoding::XorDelta => xor_into(dst, out),
        Encoding::SubDelta => add_words(dst, out),
        Encoding::SparseDelta => sparse::apply(dst, out, what)?,
        Encoding::Full | Encoding::PrefixDelta | Encoding::KvChunk => dst.copy_from_slice(out),
    }
    Ok(())
}

/// zstd contexts and scratch space of one encoding thread.
pub struct Coder<'a> {
    cctx: zstd::zstd_safe::CCtx<'a>,
    dctx: zstd::zstd_safe::DCtx<'a>,
    scratch: Vec<u8>,
    /// For decoding; kept, as a sparse payload needs 2.5 pages.
    decode_scratch: Vec<u8>,
}

impl Coder<'_> {
    pub fn new() -> Result<Self> {
        Ok(Self {
            cctx: compressor()?,
            dctx: decompressor()?,
            scratch: Vec::new(),
            decode_scratch: Vec::new(),
        })
    }

    pub fn whole(&mut self, page: &[u8]) -> Result<(Encoding, Vec<u8>)> {
        self.encode(Encoding::Full, page, &[])
    }

    fn encode(
        &mut self,
        encoding: Encoding,
        page: &[u8],
        base: &[u8],
    ) -> Result<(Encoding, Vec<u8>)> {
        let payload = encode_payload(&mut self.cctx, encoding, page, base, &mut self.scratch)?;
        Ok((encoding, payload))
    }

    /// The smallest delta of `page` against `base`: XOR (bytes changed in place: flags,
    /// pointers) or the changed words alone (scattered counters and slots); and if both
    /// are big, a prefix delta (bytes that moved). A page rewritten all over goes straight
    /// to a prefix delta (`DENSE_PERCENT`). Dense subtraction (encoding 4) is no
    /// longer tried: on the memory of four guests over 38 checkpoints, taking it where
    /// it beat both saved under 0.01 %.
    pub fn best_delta(&mut self, page: &[u8], base: &[u8]) -> Result<(Encoding, Vec<u8>)> {
        let dense = sparse::changed_words(page, base) * 100 > page.len() / 4 * DENSE_PERCENT;
        if dense && prefix_usable(base) {
            return self.encode(Encoding::PrefixDelta, page, base);
        }
        let mut best = self.encode(Encoding::XorDelta, page, base)?;
        let sparse = self.encode(Encoding::SparseDelta, page, base)?;
        if sparse.1.len() < best.1.len() {
            best = sparse;
        }
        if best.1.len() > PREFIX_WORTH && prefix_usable(base) {
            let prefix = self.encode(Encoding::PrefixDelta, page, base)?;
            if prefix.1.len() < best.1.len() {
                best = prefix;
            }
        }
        Ok(best)
    }

    /// [`decode_payload`] with this coder's context and scratch space.
    pub fn decode(
        &mut self,
        encoding: Encoding,
        payload: &[u8],
        dst: &mut [u8],
        what: &str,
    ) -> Result<()> {
        decode_payload(
            encoding,
            payload,
            dst,
            &mut self.decode_scratch,
            &mut self.dctx,
            what,
        )
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
    use crate::state::PAGE_SIZE;

    /// `new` as a delta over `old` in `encoding`: checks it rebuilds `new` exactly, and
    /// returns the payload's size.
    fn delta_size(coder: &mut Coder<'_>, encoding: Encoding, new: &[u8], old: &[u8]) -> usize {
        let (_, payload) = coder.encode(encoding, new, old).unwrap();
        let mut out = old.to_vec();
        coder.decode(encoding, &payload, &mut out, "t").unwrap();
        assert!(
            out == new,
            "a {encoding:?} payload does not rebuild the page"
        );
        payload.len()
    }

    #[test]
    fn every_encoding_round_trips() {
        let mut coder = Coder::new().unwrap();
        let old: Vec<u8> = (0..65536u32).map(|j| (j >> 5) as u8).collect();
        let new: Vec<u8> = (0..65536u32)
            .map(|j| (j.wrapping_mul(3) >> 5) as u8)
            .collect();
        let (_, whole) = coder.whole(&new).unwrap();
        let mut out = vec![0; new.len()];
        coder.decode(Encoding::Full, &whole, &mut out, "t").unwrap();
        assert_eq!(out, new);
        for encoding in [
            Encoding::XorDelta,
            Encoding::PrefixDelta,
            Encoding::SubDelta,
            Encoding::SparseDelta,
        ] {
            delta_size(&mut coder, encoding, &new, &old);
        }
    }

    #[test]
    fn moved_bytes_go_as_a_prefix_delta_and_grown_counters_as_subtraction() {
        let mut coder = Coder::new().unwrap();
        // Incompressible bytes that moved by 1000: a prefix delta finds them, XOR cannot.
        let old = noise(0x9E37_79B9_7F4A_7C15, 65536);
        let moved = [&old[1000..], &old[..1000]].concat();
        let prefix = delta_size(&mut coder, Encoding::PrefixDelta, &moved, &old);
        let xor = delta_size(&mut coder, Encoding::XorDelta, &moved, &old);
        assert!(
            prefix < 2000 && xor > 60_000,
            "prefix {prefix} B, xor {xor} B"
        );

        let counters: Vec<u8> = (0..16_384u32)
            .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
            .collect();
        let grown: Vec<u8> = counters
            .chunks_exact(4)
            .flat_map(|w| (u32::from_le_bytes(w.try_into().unwrap()) + 1).to_le_bytes())
            .collect();
        let sub = delta_size(&mut coder, Encoding::SubDelta, &grown, &counters);
        let xor = delta_size(&mut coder, Encoding::XorDelta, &grown, &counters);
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
        let mut coder = Coder::new().unwrap();
        let sizes: Vec<_> = [
            Encoding::SparseDelta,
            Encoding::SubDelta,
            Encoding::XorDelta,
        ]
        .into_iter()
        .map(|e| delta_size(&mut coder, e, &new, &old))
        .collect();
        assert!(
            sizes[0] * 2 < sizes[1].min(sizes[2]),
            "sparse, subtraction, XOR: {sizes:?} B"
        );
        // A sparse stream for a page of another length does not decode.
        let (_, payload) = coder.encode(Encoding::SparseDelta, &new, &old).unwrap();
        let mut short = vec![0; 4096];
        let err = coder
            .decode(Encoding::SparseDelta, &payload, &mut short, "t")
            .unwrap_err();
        assert_eq!(
            crate::error::kind_of(&err),
            crate::error::ErrorKind::Corrupt
        );
    }

    #[test]
    fn the_best_delta_is_the_smallest_kind_for_each_change_and_any_change_encodes() {
        let mut coder = Coder::new().unwrap();
        let old = noise(1, PAGE_SIZE);
        // Scattered counters: sparse. Single bytes set in place (a hash table's
        // control bytes): XOR, as a byte's change high in a word is a large difference.
        // Moved: prefix.
        let mut counters = old.clone();
        let mut flags = old.clone();
        let spots = noise(3, 600);
        for (i, spot) in spots.chunks_exact(2).enumerate() {
            let at = (usize::from(spot[0]) + 256 * (i % 256)) & !3;
            counters[at] = counters[at].wrapping_add(1);
            flags[at + 2] = spot[1];
        }
        let moved = [&old[100..], &old[..100]].concat();
        for (page, expected) in [
            (&counters, Encoding::SparseDelta),
            (&flags, Encoding::XorDelta),
            (&moved, Encoding::PrefixDelta),
        ] {
            assert_eq!(coder.best_delta(page, &old).unwrap().0, expected);
        }
        // Every word changed: the sparse stream is longer than the page, and still no error.
        let noise = noise(2, PAGE_SIZE);
        let (_, payload) = coder.best_delta(&noise, &old).unwrap();
        assert!(payload.len() > PAGE_SIZE);
    }

    #[test]
    fn a_page_that_looks_like_a_zstd_dictionary_is_no_prefix() {
        let mut base = vec![0u8; 65536];
        base[..4].copy_from_slice(&0xEC30_A437u32.to_le_bytes());
        assert!(!prefix_usable(&base));
        assert!(prefix_usable(&[0u8; 65536]));
    }
}
