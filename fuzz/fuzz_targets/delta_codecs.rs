//! The page codecs (`wasnap::delta`): whole pages and every delta encoding.
//!
//! 1. Round trip: a base page and a new page (64 KiB each) are built from the input;
//!    `new` encoded against `base` in every encoding, and by `Coder::best_delta` (whose
//!    previous version went whole or not, bit 7; it may say the page is better whole) and
//!    `Coder::whole`, must decode against `base` to `new` exactly. The sparse stream and
//!    the word deltas also round-trip on pages of odd lengths (tails of 1 to 3 bytes),
//!    where the survey of a rewritten page, also on pages of different lengths, must
//!    give a share.
//! 2. Garbage: the rest of the input, as it is and zstd-compressed (so it reaches the
//!    delta appliers past zstd), is decoded as a payload of every encoding, and applied
//!    as a raw sparse stream. Errors are fine; a panic, a hang or an unbounded
//!    allocation is not.
//!
//! Input: a control byte, then bytes split in two halves `a` and `b`. Bits 0-1 of the
//! control byte pick how `a` fills the base page, bits 2-3 how `b` turns it into the new
//! page, bits 4-5 how many bytes (0-3) are cut off for the odd-length round trip, bit 6
//! swaps the two pages' roles (the new page encoded against the base, or back), bit 7
//! says whether the previous version went whole (`best_delta` may then survey it).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use wasnap::delta::{self, Coder, Encoding, sparse};
use wasnap::store::pack::MAX_FRAME_PAYLOAD;

const PAGE: usize = 64 * 1024;

const EVERY: [Encoding; 5] = [
    Encoding::Full,
    Encoding::XorDelta,
    Encoding::PrefixDelta,
    Encoding::SubDelta,
    Encoding::SparseDelta,
];

struct Contexts {
    cctx: zstd::zstd_safe::CCtx<'static>,
    dctx: zstd::zstd_safe::DCtx<'static>,
    coder: Coder<'static>,
    scratch: Vec<u8>,
    decode_scratch: Vec<u8>,
    survey: delta::survey::Survey,
}

thread_local! {
    // One set per thread, reused as the pipeline reuses its coders.
    static CONTEXTS: RefCell<Contexts> = RefCell::new(Contexts {
        cctx: delta::compressor().expect("zstd context"),
        dctx: delta::decompressor().expect("zstd context"),
        coder: Coder::new().expect("zstd contexts"),
        scratch: Vec::new(),
        decode_scratch: Vec::new(),
        survey: delta::survey::Survey::default(),
    });
}

/// A page filled from `bytes` in one of four ways.
fn fill(bytes: &[u8], mode: u8) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    if bytes.is_empty() {
        return page;
    }
    match mode & 3 {
        // Repeated over the whole page.
        0 => page
            .iter_mut()
            .zip(bytes.iter().cycle())
            .for_each(|(p, b)| *p = *b),
        // At the start, zeros after: a page mostly untouched.
        1 => page[..bytes.len().min(PAGE)].copy_from_slice(&bytes[..bytes.len().min(PAGE)]),
        // At the end.
        2 => {
            let n = bytes.len().min(PAGE);
            page[PAGE - n..].copy_from_slice(&bytes[..n]);
        }
        // Repeated, each repetition different (counters, pointers).
        _ => page
            .iter_mut()
            .zip(bytes.iter().cycle())
            .enumerate()
            .for_each(|(i, (p, b))| *p = b.wrapping_add((i / bytes.len()) as u8)),
    }
    page
}

/// `base` changed as `bytes` say, in one of four ways.
fn mutate(base: &[u8], bytes: &[u8], mode: u8) -> Vec<u8> {
    let mut page = base.to_vec();
    let edits = bytes
        .chunks_exact(3)
        .map(|e| (usize::from(u16::from_le_bytes([e[0], e[1]])), e[2]));
    match mode & 3 {
        // Bytes set in place.
        0 => edits.for_each(|(at, v)| page[at] = v),
        // 32-bit words bumped by small amounts up and down (what sparse deltas are for).
        1 => edits.for_each(|(at, v)| {
            let at = at / 4 * 4;
            let w = u32::from_le_bytes(page[at..at + 4].try_into().unwrap());
            let w = w.wrapping_add(i32::from(v as i8) as u32);
            page[at..at + 4].copy_from_slice(&w.to_le_bytes());
        }),
        // Moved (what prefix deltas are for): rotated, then bytes set.
        2 => {
            let by = bytes
                .get(..2)
                .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
            page.rotate_left(by % PAGE);
            edits.skip(1).for_each(|(at, v)| page[at] = v);
        }
        // Unrelated to the base.
        _ => page = fill(bytes, bytes.first().copied().unwrap_or(0)),
    }
    page
}

fn round_trips(c: &mut Contexts, base: &[u8], new: &[u8], last_went_whole: bool) {
    for encoding in EVERY {
        if encoding == Encoding::PrefixDelta && !delta::prefix_usable(base) {
            continue; // documented precondition of encode_payload
        }
        let payload = delta::encode_payload(&mut c.cctx, encoding, new, base, &mut c.scratch)
            .unwrap_or_else(|e| panic!("{encoding:?} does not encode: {e:#}"));
        let mut out = if encoding == Encoding::Full {
            vec![0xA5; PAGE]
        } else {
            base.to_vec()
        };
        delta::decode_payload(
            encoding,
            &payload,
            &mut out,
            &mut c.decode_scratch,
            &mut c.dctx,
            "fuzz",
        )
        .unwrap_or_else(|e| panic!("{encoding:?} does not decode its own encoding: {e:#}"));
        assert!(out == new, "{encoding:?} does not rebuild the page");
    }

    // What the pipeline writes: the best delta (unless the page is better whole), and
    // whole pages; both fit a frame.
    let best = c.coder.best_delta(new, base, last_went_whole).expect("best_delta");
    if let Some((encoding, payload)) = best {
        assert!(encoding.is_delta());
        assert!(
            payload.len() <= MAX_FRAME_PAYLOAD,
            "{encoding:?} payload too large"
        );
        let mut out = base.to_vec();
        c.coder
            .decode(encoding, &payload, &mut out, "fuzz")
            .unwrap_or_else(|e| panic!("best delta {encoding:?} does not decode: {e:#}"));
        assert!(
            out == new,
            "best delta {encoding:?} does not rebuild the page"
        );
    }

    let (encoding, payload) = c.coder.whole(new).expect("whole");
    assert_eq!(encoding, Encoding::Full);
    assert!(
        payload.len() <= MAX_FRAME_PAYLOAD,
        "whole page payload too large"
    );
    let mut out = vec![0x5A; PAGE];
    c.coder
        .decode(encoding, &payload, &mut out, "fuzz")
        .expect("a whole page decodes");
    assert!(out == new, "a whole page does not rebuild the page");
}

/// The sparse stream and the word deltas on a page of any length, and the survey.
fn odd_length_round_trips(c: &mut Contexts, base: &[u8], new: &[u8]) {
    let mut stream = Vec::new();
    sparse::encode(new, base, &mut stream);
    assert!(stream.len() <= sparse::max_stream_len(new.len()));
    let mut out = base.to_vec();
    sparse::apply(&mut out, &stream, "fuzz").expect("a sparse stream applies to its base");
    assert!(out == new, "a sparse stream does not rebuild the page");
    let changed = sparse::changed_words(new, base);
    assert_eq!(changed == 0, new == base);

    let mut d = new.to_vec();
    delta::xor_into(&mut d, base);
    delta::xor_into(&mut d, base);
    assert!(d == new, "xor is not its own inverse");
    let mut d = new.to_vec();
    delta::sub_words(&mut d, base);
    delta::add_words(&mut d, base);
    assert!(d == new, "add_words does not undo sub_words");
    assert!(c.survey.found_percent(new, base) <= 100);
    assert!(c.survey.found_percent(new, &base[..base.len() / 3]) <= 100);
    assert!(c.survey.found_percent(&new[..new.len() / 3], base) <= 100);
}

fn garbage(c: &mut Contexts, base: &[u8], payload: &[u8]) {
    for encoding in EVERY {
        let mut out = base.to_vec();
        let _ = delta::decode_payload(
            encoding,
            payload,
            &mut out,
            &mut c.decode_scratch,
            &mut c.dctx,
            "fuzz",
        );
        assert_eq!(out.len(), PAGE);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = rest.split_at(rest.len() / 2);
    let base = fill(a, control);
    let new = mutate(&base, b, control >> 2);
    let cut = usize::from((control >> 4) & 3);

    CONTEXTS.with_borrow_mut(|c| {
        let last_went_whole = control & 0x80 != 0;
        if control & 0x40 == 0 {
            round_trips(c, &base, &new, last_went_whole);
        } else {
            round_trips(c, &new, &base, last_went_whole);
        }
        odd_length_round_trips(c, &base[..PAGE - cut], &new[..PAGE - cut]);
        let len = rest.len().min(PAGE);
        odd_length_round_trips(c, &base[..len], &new[..len]);

        garbage(c, &base, rest);
        let compressed = zstd::bulk::compress(rest, 1).expect("zstd compresses anything");
        garbage(c, &base, &compressed);
        for len in [PAGE, PAGE - cut, rest.len() % 70] {
            let mut out = base[..len].to_vec();
            let _ = sparse::apply(&mut out, rest, "fuzz");
        }
    });
});
