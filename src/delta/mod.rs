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
//! [`Coder`] holds one thread's zstd contexts and picks the smallest delta for a page, or
//! says a page is better whole without compressing a delta (`survey`).

pub mod sparse;
pub mod survey;
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

/// Below this, a sparse (or XOR) delta is not worth a prefix delta's compression (the
/// costliest: zstd indexes the previous version first). Prefix deltas win where bytes
/// moved, and then by far; with bytes changed in place they win a few percent at most.
/// 7 KiB rather than 8: in `wasnap bench` runs of eight guests (a checkpoint every 1 000
/// records), the prefix deltas it adds save up to 1 % of the bytes of the AssemblyScript
/// guests, which pays for skipping XOR (`XOR_WORTH`); 6 KiB wrote 0.6 % more on the C word
/// count, whose smaller deltas then kept chains going that a whole page would have reset.
const PREFIX_WORTH: usize = 7168;

/// An XOR delta is compressed only when the sparse stream spends at least this many
/// bytes on each changed word: its differences are then large (a byte set high in a word:
/// flags, pointers, control bytes), which XOR's bytes in place can code smaller. Where
/// differences are small, XOR won on none of the dirty pages of eight guests; over all
/// of them it won on under 0.3 %, each at 4.1 bytes a word or more in the C word count
/// (where XOR matters most) and at 3.4 or more elsewhere. Skipping it elsewhere cut the
/// time per page of the light deltas by a third and wrote at most 0.07 % more bytes.
const XOR_WORTH: usize = 4;

/// Past this share of changed 32-bit words (in percent), a page was rewritten rather than
/// edited (a table rehashed, objects moved, a collector's marks on every object): XOR and
/// sparse deltas then come out a quarter larger than a prefix delta, so only the prefix
/// delta is compressed. On the dirty pages of six guests (120 checkpoints each), this cut
/// the encoding time of the AssemblyScript and C-sessions guests' pages by 41–46 % and
/// wrote at most 0.3 % more bytes (a 25 % threshold: up to 1.2 % more).
const DENSE_PERCENT: usize = 35;

/// A page rewritten past `DENSE_PERCENT`, whose previous version went whole, and whose
/// sampled bytes that version holds under this share (in percent, `survey`), is not
/// worth a prefix delta: with so little to leave out, it loses to the whole page. On the
/// dirty pages of eight guests (120 checkpoints each), each of the 314 rewritten pages
/// under 25 % would have lost (the C sessions guest: 225 of its 239 rewritten pages; its
/// encode step 1.61x cheaper a dirty page); from 25 to 30 %, 11 of 196 would have won.
const FOUND_WORTH: usize = 25;

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
/// magic cannot serve as a raw prefix: use [`prefix_usable`] first. (The engine itself
/// encodes through [`Coder`], into reused buffers.)
#[cfg(any(test, feature = "internals"))]
pub fn encode_payload(
    cctx: &mut zstd::zstd_safe::CCtx<'_>,
    encoding: Encoding,
    page: &[u8],
    base: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_payload_into(cctx, encoding, page, base, scratch, &mut out)?;
    Ok(out)
}

/// [`encode_payload`] into `out` (cleared first), whose allocation a caller trying several
/// encodings of many pages reuses: a payload's room is zstd's bound for the whole page
/// (64-160 KiB), most of it unused by a delta.
pub fn encode_payload_into(
    cctx: &mut zstd::zstd_safe::CCtx<'_>,
    encoding: Encoding,
    page: &[u8],
    base: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let longest = encoding.max_decoded_len(page.len());
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(longest));
    let level = |cctx: &mut zstd::zstd_safe::CCtx<'_>, level| {
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
            .map_err(zstd_error)
    };
    let written = match encoding {
        Encoding::Full => {
            level(cctx, ZSTD_LEVEL)?;
            cctx.compress2(out, page)
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
            cctx.compress2(out, scratch)
        }
        Encoding::SparseDelta => {
            sparse::encode(page, base, scratch);
            level(cctx, DELTA_ZSTD_LEVEL)?;
            cctx.compress2(out, scratch)
        }
        Encoding::KvChunk => anyhow::bail!("a kv chunk is not a page encoding"),
        // The previous version as a raw-content dictionary, which zstd references in
        // place. Laid out right before the page, so zstd sees one contiguous window instead
        // of an external dictionary: measured 26 % faster on the AssemblyScript guests'
        // pages, for a copy of two pages.
        Encoding::PrefixDelta => {
            scratch.clear();
            scratch.extend_from_slice(base);
            scratch.extend_from_slice(page);
            let (base, page) = scratch.split_at(base.len());
            cctx.compress_using_dict(out, page, base, ZSTD_LEVEL)
        }
    };
    written
        .map_err(zstd_error)
        .context("cannot compress a page")?;
    Ok(())
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
    let prefix = (encoding == Encoding::PrefixDelta).then_some(&*dst);
    let out = decompress(encoding, payload, prefix, dst.len(), scratch, dctx, what)?;
    let n = out.len();
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

/// Decompress a payload of `encoding` for a page of `page_len` bytes into `scratch`
/// (grown as needed), at most what such a payload can hold; `prefix`: a prefix delta's
/// previous version.
fn decompress<'s>(
    encoding: Encoding,
    payload: &[u8],
    prefix: Option<&[u8]>,
    page_len: usize,
    scratch: &'s mut Vec<u8>,
    dctx: &mut zstd::zstd_safe::DCtx<'_>,
    what: &str,
) -> Result<&'s [u8]> {
    let capacity = encoding.max_decoded_len(page_len);
    if scratch.len() < capacity {
        scratch.resize(capacity, 0);
    }
    let out = &mut scratch[..capacity];
    let n = match prefix {
        Some(prefix) => dctx.decompress_using_dict(&mut *out, payload, prefix),
        None => dctx.decompress(&mut *out, payload),
    }
    .map_err(|code| {
        crate::error::corrupt!(
            "{what} is corrupt: a frame does not decompress ({})",
            zstd_error(code)
        )
    })?;
    Ok(&scratch[..n])
}

/// Undo a delta payload of `encoding`: turn `dst` (the version it produced) back into
/// the version it was applied to, calling `touched(word, before, after)` for each 32-bit
/// word that changes. XOR, subtraction and sparse deltas say by how much each word moved,
/// so they run backwards; `Ok(false)` for the others (a prefix delta's bytes do not say
/// what they replaced; a whole page has nothing under it), leaving `dst` as it was.
/// `dst`'s length must be whole words; a payload that does not fit it is `Corrupt`, and
/// `dst` is then partly undone.
pub fn undo_payload(
    encoding: Encoding,
    payload: &[u8],
    dst: &mut [u8],
    scratch: &mut Vec<u8>,
    dctx: &mut zstd::zstd_safe::DCtx<'_>,
    what: &str,
    mut touched: impl FnMut(usize, u32, u32),
) -> Result<bool> {
    // What a word was, from what it is and the payload's word there.
    let undo_words: fn(u32, u32) -> u32 = match encoding {
        Encoding::XorDelta => |word, x| word ^ x,
        Encoding::SubDelta | Encoding::SparseDelta => u32::wrapping_sub,
        Encoding::Full | Encoding::PrefixDelta | Encoding::KvChunk => return Ok(false),
    };
    if !dst.len().is_multiple_of(4) {
        return Err(crate::error::corrupt!(
            "{what} cannot be undone on a page of {} bytes",
            dst.len()
        ));
    }
    let out = decompress(encoding, payload, None, dst.len(), scratch, dctx, what)?;
    let n = out.len();
    if encoding == Encoding::SparseDelta {
        sparse::undo(dst, out, what, touched)?;
        return Ok(true);
    }
    if n != dst.len() {
        return Err(crate::error::corrupt!(
            "{what} is corrupt: a frame holds {n} bytes, expected {}",
            dst.len()
        ));
    }
    // Dense: a word of the payload is zero where the page's word did not change.
    let word = |bytes: &[u8]| u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
    for (i, (d, o)) in dst.chunks_exact_mut(4).zip(out.chunks_exact(4)).enumerate() {
        let o = word(o);
        if o != 0 {
            let before = word(d);
            let after = undo_words(before, o);
            d.copy_from_slice(&after.to_le_bytes());
            touched(i, before, after);
        }
    }
    Ok(true)
}

/// zstd contexts and scratch space of one encoding thread. Coders are reused across
/// pages, checkpoints and tasks ([`with_coder`]): every zstd parameter an encoding relies
/// on is set again for each payload, so what one use leaves behind never changes the next.
pub struct Coder<'a> {
    cctx: zstd::zstd_safe::CCtx<'a>,
    dctx: zstd::zstd_safe::DCtx<'a>,
    scratch: Vec<u8>,
    /// The smallest payload so far and the one being tried: only the winner is copied out,
    /// at its own size.
    best: Vec<u8>,
    candidate: Vec<u8>,
    /// For decoding; kept, as a sparse payload needs 2.5 pages.
    decode_scratch: Vec<u8>,
    survey: survey::Survey,
}

impl Coder<'_> {
    pub fn new() -> Result<Self> {
        Ok(Self {
            cctx: compressor()?,
            dctx: decompressor()?,
            scratch: Vec::new(),
            best: Vec::new(),
            candidate: Vec::new(),
            decode_scratch: Vec::new(),
            survey: survey::Survey::default(),
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
        self.try_encoding(encoding, page, base)?;
        Ok((encoding, self.candidate.to_vec()))
    }

    /// Compress into `candidate`.
    fn try_encoding(&mut self, encoding: Encoding, page: &[u8], base: &[u8]) -> Result<()> {
        encode_payload_into(
            &mut self.cctx,
            encoding,
            page,
            base,
            &mut self.scratch,
            &mut self.candidate,
        )
    }

    /// The smallest delta of `page` against `base`, trying the encodings that can win;
    /// `None` when the page is better whole:
    ///
    /// - a page rewritten all over (`DENSE_PERCENT`) goes straight to a prefix delta;
    ///   but when its previous version went whole (`last_went_whole`: a chain's first
    ///   frame, often a rewrite a delta lost to) and holds too few of its bytes
    ///   (`FOUND_WORTH`), to no delta at all. (Pages whose last delta won are not
    ///   surveyed: on the AssemblyScript guests 94–98 % of them won again, and the survey
    ///   costs up to a tenth of a prefix delta.)
    /// - otherwise the changed words alone (scattered counters and slots), and XOR (bytes
    ///   changed in place) only where the sparse stream says the differences are large
    ///   (`XOR_WORTH`);
    /// - and if that is still big (`PREFIX_WORTH`), a prefix delta (bytes that moved).
    ///
    /// Dense subtraction (encoding 4) is no longer tried: on the memory of four guests
    /// over 38 checkpoints, taking it where it beat both saved under 0.01 %.
    pub fn best_delta(
        &mut self,
        page: &[u8],
        base: &[u8],
        last_went_whole: bool,
    ) -> Result<Option<(Encoding, Vec<u8>)>> {
        let changed = sparse::changed_words(page, base);
        let prefix_ok = prefix_usable(base);
        if changed * 100 > page.len() / 4 * DENSE_PERCENT && prefix_ok {
            if last_went_whole && self.survey.found_percent(page, base) < FOUND_WORTH {
                return Ok(None);
            }
            return self.encode(Encoding::PrefixDelta, page, base).map(Some);
        }
        self.try_encoding(Encoding::SparseDelta, page, base)?;
        // The sparse stream is still in `scratch`.
        let large_differences = self.scratch.len() >= XOR_WORTH * changed.max(1);
        std::mem::swap(&mut self.best, &mut self.candidate);
        let mut best = Encoding::SparseDelta;
        let mut consider = |coder: &mut Self, encoding| -> Result<()> {
            coder.try_encoding(encoding, page, base)?;
            if coder.candidate.len() < coder.best.len() {
                std::mem::swap(&mut coder.best, &mut coder.candidate);
                best = encoding;
            }
            Ok(())
        };
        if large_differences {
            consider(self, Encoding::XorDelta)?;
        }
        if self.best.len() > PREFIX_WORTH && prefix_ok {
            consider(self, Encoding::PrefixDelta)?;
        }
        Ok(Some((best, self.best.to_vec())))
    }

    /// [`undo_payload`] with this coder's context and scratch space.
    pub fn undo(
        &mut self,
        encoding: Encoding,
        payload: &[u8],
        dst: &mut [u8],
        what: &str,
        touched: impl FnMut(usize, u32, u32),
    ) -> Result<bool> {
        undo_payload(
            encoding,
            payload,
            dst,
            &mut self.decode_scratch,
            &mut self.dctx,
            what,
            touched,
        )
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

/// Coders kept between checkpoints, for the whole process: a coder's zstd contexts,
/// once used, hold about a megabyte of tables, and setting them up at every checkpoint was
/// half the counter guest's encode step (two dirty pages a checkpoint: 27 ms of CPU over
/// 200 pages, 12 ms with coders kept). At most one per core is kept; more may run at once
/// (every task's committer encodes too), and those are dropped after use.
static IDLE_CODERS: std::sync::Mutex<Vec<Coder<'static>>> = std::sync::Mutex::new(Vec::new());

/// Run `work` with a coder from the process's idle ones (or a new one), and keep it for
/// the next caller. A coder whose work failed is dropped, not kept.
pub fn with_coder<R>(work: impl FnOnce(&mut Coder<'static>) -> Result<R>) -> Result<R> {
    // A panic elsewhere cannot leave the list half-updated (a pop or a push): use it anyway.
    let idle = || {
        IDLE_CODERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let taken = idle().pop();
    let mut coder = match taken {
        Some(coder) => coder,
        None => Coder::new()?,
    };
    let result = work(&mut coder)?;
    let keep = crate::snapshot::parallel::cores();
    let mut coders = idle();
    if coders.len() < keep {
        coders.push(coder);
    }
    Ok(result)
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

    #[test]
    fn dense_and_sparse_deltas_are_undone_word_by_word_and_prefix_deltas_are_not() {
        // 1 028 bytes: an odd number of words, the last on its own.
        let old: Vec<u8> = (0..1028u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut new = old.clone();
        for at in [0, 4, 520, 1024] {
            new[at + 1] = new[at + 1].wrapping_add(1 + at as u8);
        }
        let mut coder = Coder::new().unwrap();
        for encoding in [
            Encoding::XorDelta,
            Encoding::SubDelta,
            Encoding::SparseDelta,
        ] {
            let (_, payload) = coder.encode(encoding, &new, &old).unwrap();
            let mut back = new.clone();
            let mut touched = Vec::new();
            let undone = coder.undo(encoding, &payload, &mut back, "t", |word, _, _| {
                touched.push(word);
            });
            assert!(undone.unwrap(), "{encoding:?}");
            assert_eq!(back, old, "{encoding:?}");
            assert_eq!(touched, [0, 1, 130, 256], "{encoding:?}");
        }
        let quietly = |coder: &mut Coder<'_>, encoding, payload: &[u8], dst: &mut [u8]| {
            coder.undo(encoding, payload, dst, "t", |_, _, _| ())
        };
        let (_, payload) = coder.encode(Encoding::PrefixDelta, &new, &old).unwrap();
        let mut back = new.clone();
        let undone = quietly(&mut coder, Encoding::PrefixDelta, &payload, &mut back);
        assert!(!undone.unwrap());
        assert_eq!(back, new, "left as it was");
        // A page of part words, and a payload for another page, are refused.
        let (_, payload) = coder.encode(Encoding::XorDelta, &new, &old).unwrap();
        for len in [1027, 1024] {
            let undone = quietly(&mut coder, Encoding::XorDelta, &payload, &mut back[..len]);
            assert!(undone.is_err(), "{len} bytes");
        }
    }

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
            assert_eq!(
                coder.best_delta(page, &old, true).unwrap().unwrap().0,
                expected
            );
        }
        // Every word changed, to bytes the old page does not hold: no delta (whole).
        let noise = noise(2, PAGE_SIZE);
        assert!(coder.best_delta(&noise, &old, true).unwrap().is_none());
        // Unless its previous version was a delta that won: then it is not surveyed.
        let (encoding, _) = coder.best_delta(&noise, &old, false).unwrap().unwrap();
        assert_eq!(encoding, Encoding::PrefixDelta);
        // The same against a base that cannot be a prefix: the sparse stream is longer
        // than the page, and still no error.
        let mut no_prefix = old.clone();
        no_prefix[..4].copy_from_slice(&0xEC30_A437u32.to_le_bytes());
        let (_, payload) = coder.best_delta(&noise, &no_prefix, true).unwrap().unwrap();
        assert!(payload.len() > PAGE_SIZE);
    }

    #[test]
    fn a_rewritten_page_goes_whole_only_where_its_prefix_delta_would_lose() {
        // Every word changed: the first part of the page is the old page moved by a byte,
        // the rest new bytes of the same kind (noise; text-like bytes that compress). Up
        // to 10 % found, the prefix delta would lose to the whole page by the fifth the
        // committer asks of a delta, and best_delta says "whole" (None); from 30 % found
        // it would win, and best_delta tries it. At 20 % the delta is four fifths of the
        // whole page, the break-even, where either answer is right. (The survey takes
        // found and new bytes to compress alike.)
        let mut coder = Coder::new().unwrap();
        let text = |seed| -> Vec<u8> {
            noise(seed, PAGE_SIZE)
                .iter()
                .map(|b| b"etaoin shrdlu"[usize::from(*b) % 13])
                .collect()
        };
        for (old, new_bytes) in [
            (noise(7, PAGE_SIZE), noise(8, PAGE_SIZE)),
            (text(9), text(10)),
        ] {
            for found in [0, 5, 10, 30, 50, 70, 90] {
                let kept = PAGE_SIZE * found / 100;
                let page = [&old[1..=kept], &new_bytes[kept..]].concat();
                let prefix = delta_size(&mut coder, Encoding::PrefixDelta, &page, &old);
                let whole = coder.whole(&page).unwrap().1.len();
                let would_win = prefix * 5 < whole * 4;
                assert_eq!(
                    would_win,
                    found >= 30,
                    "{found} %: {prefix} B against {whole} B"
                );
                match coder.best_delta(&page, &old, true).unwrap() {
                    None => assert!(!would_win, "{found} % found: whole"),
                    Some((encoding, _)) => assert!(
                        would_win && encoding == Encoding::PrefixDelta,
                        "{found} % found: {encoding:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn the_encodings_best_delta_skips_would_not_have_been_smaller() {
        // Pages changed as guests change them, at several densities. best_delta tries
        // XOR only where the differences are large: it must still be within 1 % of the
        // smaller of sparse and XOR. And it tries a prefix delta only past
        // `PREFIX_WORTH` (below, a prefix delta may be a little smaller: by design), so
        // past it, within 1 % of the prefix delta too.
        let mut coder = Coder::new().unwrap();
        let old: Vec<u8> = noise(5, PAGE_SIZE)
            .chunks_exact(4)
            .flat_map(|w| (u32::from_le_bytes(w.try_into().unwrap()) & 0x00FF_0FFF).to_le_bytes())
            .collect();
        let spots = noise(6, 2 * PAGE_SIZE);
        for changes in [10, 100, 1000, 3000, 5000] {
            let (mut counters, mut flags, mut pointers) = (old.clone(), old.clone(), old.clone());
            for spot in spots.chunks_exact(4).take(changes) {
                let at = usize::from(u16::from_le_bytes([spot[0], spot[1]])) & !3;
                let bump = u32::from(spot[2] % 8) + 1;
                let word = u32::from_le_bytes(counters[at..at + 4].try_into().unwrap());
                counters[at..at + 4].copy_from_slice(&(word + bump).to_le_bytes());
                flags[at + 2] = spot[3];
                pointers[at..at + 4].copy_from_slice(spot);
            }
            for (kind, page) in [
                ("counters", &counters),
                ("flags", &flags),
                ("pointers", &pointers),
            ] {
                let (encoding, payload) = coder.best_delta(page, &old, true).unwrap().unwrap();
                let mut rebuilt = old.clone();
                coder.decode(encoding, &payload, &mut rebuilt, "t").unwrap();
                assert!(
                    rebuilt == *page,
                    "{changes} changed {kind}: {encoding:?} does not rebuild"
                );
                let chosen = payload.len();
                let [sparse, xor, prefix] = [
                    Encoding::SparseDelta,
                    Encoding::XorDelta,
                    Encoding::PrefixDelta,
                ]
                .map(|e| delta_size(&mut coder, e, page, &old));
                let mut smallest = sparse.min(xor);
                if chosen > PREFIX_WORTH {
                    smallest = smallest.min(prefix);
                }
                assert!(
                    chosen * 100 <= smallest * 101,
                    "{changes} changed {kind}: best_delta {chosen} B; sparse {sparse} B, \
                     XOR {xor} B, prefix {prefix} B"
                );
            }
        }
    }

    #[test]
    fn a_kept_coder_encodes_exactly_as_a_fresh_one() {
        // Every kind of payload in turn, through the process's kept coders (whichever this
        // thread gets), then each again with a fresh coder: byte for byte the same.
        let old = noise(11, PAGE_SIZE);
        let mut moved = old.clone();
        moved.rotate_left(100);
        let mut counters = old.clone();
        for at in (0..PAGE_SIZE).step_by(1024) {
            counters[at] = counters[at].wrapping_add(1);
        }
        let pages = [
            (&moved, true),
            (&counters, false),
            (&noise(12, PAGE_SIZE), true),
        ];
        // Each page's best delta (if any) and its whole payload.
        type Payloads = (Option<(Encoding, Vec<u8>)>, Vec<u8>);
        let encode = |coder: &mut Coder<'_>| -> Result<Vec<Payloads>> {
            pages
                .iter()
                .map(|(page, went_whole)| {
                    Ok((
                        coder.best_delta(page, &old, *went_whole)?,
                        coder.whole(page)?.1,
                    ))
                })
                .collect()
        };
        for _ in 0..3 {
            let kept = with_coder(encode).unwrap();
            let fresh = encode(&mut Coder::new().unwrap()).unwrap();
            assert!(kept == fresh, "a kept coder encoded differently");
        }
    }

    #[test]
    fn a_page_that_looks_like_a_zstd_dictionary_is_no_prefix() {
        let mut base = vec![0u8; 65536];
        base[..4].copy_from_slice(&0xEC30_A437u32.to_le_bytes());
        assert!(!prefix_usable(&base));
        assert!(prefix_usable(&[0u8; 65536]));
    }
}
