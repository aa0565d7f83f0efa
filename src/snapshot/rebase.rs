//! Rebase: where a full chain's next delta stands.
//!
//! A chain holds a whole page and at most `max_deltas` deltas, so that a restore applies
//! a bounded number of frames. Once it is full, the next version cannot go on top. Writing
//! it whole is the simple answer, but for a page that changes a little at every checkpoint
//! (a hash table's counters, a histogram) a whole page costs 10–30 deltas. Instead, the
//! chain is rebased: the new version becomes a delta against the version that layers
//! `0..=j` rebuild, and the layers above `j` are dropped from the page's chain.
//!
//! Which `j`: a delta against a low layer spans more versions, so it is bigger, but it
//! frees more room for the plain deltas that follow. Each candidate is scored by its size
//! divided by the checkpoints it buys before the chain is full again (`max_deltas - j`;
//! a whole page buys `max_deltas + 1`), and the cheapest wins. Compressing every
//! candidate would cost a dozen compressions per page and hold fast guests back, so the
//! layer is chosen by a proxy, the 32-bit words that differ (a pass at memory speed), and
//! only that delta and the whole page are compressed. Simulated on 120 checkpoints of
//! the C word count's real memory, the proxy chose as well as compressing every
//! candidate (11.0x vs 10.8x fewer bytes than the baseline). Measured against restarting
//! with a whole page: 2.1x fewer bytes on the C word count (always rebasing on layer 0:
//! 1.3x; SVN-style skip-deltas: 1.6x), 1.5x on the window guest.
//!
//! The versions come from the chain's own frames, read from packs the committer keeps in
//! memory or reads back from the store, walked one of two ways:
//!
//! - *down*, from the chain's top: the page's previous version, which the page cache
//!   holds and vouches for by hash (the base a plain delta is taken against), each delta
//!   undone in turn. XOR, subtraction and sparse deltas say by how much each word moved,
//!   so they run backwards, and the count of changed words follows the words each one
//!   touches. Neither the whole page at the bottom is decompressed nor a whole page
//!   counted per layer: the encode step of the guests whose chains are sparse deltas
//!   (the word counts' hash tables, a histogram) takes 1.14–1.21x less CPU;
//! - *up*, from the whole page, each delta applied and each version counted, where the
//!   walk down cannot go: no vouched previous version, or a prefix delta in the chain
//!   (which does not say what its bytes replaced), or a frame that does not undo.
//!
//! Both choose the same layer (the tests compare them). Best effort: where a pack cannot
//! be had or a frame does not decode, the walk up stops there, and at worst the page is
//! written whole.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;

use super::capture::CapturedPage;
use super::table::{FrameLoc, PageTable};
use crate::delta::{Coder, Encoding, sparse};
use crate::store::manifest::PackRef;
use crate::store::pack;
use crate::store::recent::LoadedPack;

/// The packs a checkpoint's encoders may read chain frames from, by reference.
pub type ChainPacks = HashMap<PackRef, Arc<LoadedPack>>;

/// The packs holding the frames that rebasing the full chains among `pages` may read:
/// for a page with a vouched previous version (`base`), all of its chain's, which the
/// walk down reads (the top's pack is mostly the last one written, still in memory);
/// for the others, the layers the walk up may rebase on.
pub fn packs_to_read(pages: &[CapturedPage], table: &PageTable, max_deltas: usize) -> Vec<PackRef> {
    let mut wanted = HashSet::new();
    if max_deltas == 0 {
        return Vec::new();
    }
    for page in pages {
        let chains = &table.memories[page.memory].chains;
        if let Some(chain) = chains.get(page.page as usize)
            && chain.len() > max_deltas
        {
            let read = match page.base {
                Some(_) => chain.len(),
                None => max_deltas,
            };
            wanted.extend(chain[..read].iter().map(|loc| (*loc.pack).clone()));
        }
    }
    wanted.into_iter().collect()
}

/// The cheapest way to write `page` on top of a full `chain`: how many of its frames to
/// keep, and the new frame (a delta against what the kept frames rebuild, or a whole page
/// when nothing is kept). `top` is the version the whole chain rebuilds, where the page
/// cache vouches for it.
pub fn best_rebase(
    page: &[u8],
    top: Option<&[u8]>,
    chain: &[FrameLoc],
    max_deltas: usize,
    packs: &ChainPacks,
    coder: &mut Coder<'_>,
) -> Result<(usize, (Encoding, Vec<u8>))> {
    let mut base = Vec::new();
    let chosen = match top
        .and_then(|top| walk_down(page, top, chain, max_deltas, packs, coder, &mut base))
    {
        Some(chosen) => chosen,
        None => walk_up(page, chain, max_deltas, packs, coder, &mut base),
    };
    if let Some(Candidate { layer, .. }) = chosen {
        // (A full chain: the previous version was a delta.)
        let Some(delta) = coder.best_delta(page, &base, false)? else {
            return Ok((0, coder.whole(page)?));
        };
        // delta / (max_deltas - layer) < whole / (max_deltas + 1). The chain's own whole
        // page stands in for this version's, which is compressed only if the delta loses.
        let whole_estimate = packs
            .get(&chain[0].pack)
            .and_then(|p| p.frame(chain[0].frame))
            .map_or(0, |frame| frame.len() - pack::FRAME_HEADER_LEN);
        if delta.1.len().saturating_mul(max_deltas + 1)
            < whole_estimate.saturating_mul(max_deltas - layer)
        {
            return Ok((layer + 1, delta));
        }
        let whole = coder.whole(page)?;
        if delta.1.len() * (max_deltas + 1) < whole.1.len() * (max_deltas - layer) {
            return Ok((layer + 1, delta));
        }
        return Ok((0, whole));
    }
    Ok((0, coder.whole(page)?))
}

/// A layer to rebase on, and how many 32-bit words of the page differ from its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    layer: usize,
    changed: usize,
}

impl Candidate {
    /// Fewer changed words per checkpoint bought (`max_deltas - layer`), and on a tie the
    /// lower layer: a strict order, so that either walk chooses the same layer.
    fn beats(self, other: Option<Self>, max_deltas: usize) -> bool {
        other.is_none_or(|other| {
            let (mine, theirs) = (
                self.changed * (max_deltas - other.layer),
                other.changed * (max_deltas - self.layer),
            );
            mine < theirs || (mine == theirs && self.layer < other.layer)
        })
    }
}

const WHAT: &str = "a chain's pack";

/// From the top of the chain down to its whole page, undoing a delta at each step; the
/// chosen layer's version is left in `base`. `None` where some delta of the chain cannot
/// be read or undone (the caller walks up instead).
fn walk_down(
    page: &[u8],
    top: &[u8],
    chain: &[FrameLoc],
    max_deltas: usize,
    packs: &ChainPacks,
    coder: &mut Coder<'_>,
    base: &mut Vec<u8>,
) -> Option<Option<Candidate>> {
    if top.len() != page.len() {
        return None;
    }
    let frames = chain
        .iter()
        .map(|loc| packs.get(&loc.pack)?.frame(loc.frame))
        .collect::<Option<Vec<_>>>()?;
    // A chain with a prefix delta is walked up instead: told by the encoding bytes alone,
    // before the CRCs below (the AssemblyScript guests' chains are mostly such).
    let undoable = |frame| {
        matches!(
            pack::frame_encoding_hint(frame),
            Some(Encoding::XorDelta | Encoding::SubDelta | Encoding::SparseDelta)
        )
    };
    if !frames[1..].iter().all(|frame| undoable(frame)) {
        return None;
    }
    // Every frame checked before any work, the whole page too (it is not decompressed):
    // where the walk up would stop at a frame it cannot read, so does this one.
    let checked = frames
        .iter()
        .enumerate()
        .map(|(layer, frame)| pack::layer_payload(frame, layer, WHAT).ok())
        .collect::<Option<Vec<_>>>()?;
    let deltas = &checked[1..];
    let page_word =
        |word: usize| u32::from_le_bytes(page[4 * word..4 * word + 4].try_into().expect("4 bytes"));
    let mut version = top.to_vec();
    let mut changed = sparse::changed_words(page, &version);
    let mut chosen = None;
    // Undoing the delta on layer `layer + 1` leaves the version of layer `layer`.
    for (layer, &(encoding, payload)) in deltas.iter().enumerate().rev() {
        let undone = coder.undo(
            encoding,
            payload,
            &mut version,
            WHAT,
            |word, before, after| {
                let new = page_word(word);
                changed = changed + usize::from(new != after) - usize::from(new != before);
            },
        );
        if !matches!(undone, Ok(true)) {
            return None;
        }
        let candidate = Candidate { layer, changed };
        if layer < max_deltas && candidate.beats(chosen, max_deltas) {
            chosen = Some(candidate);
            base.clear();
            base.extend_from_slice(&version);
        }
    }
    Some(chosen)
}

/// From the chain's whole page up, applying a delta at each step; the chosen layer's
/// version is left in `base`. Stops at the first frame it cannot read.
fn walk_up(
    page: &[u8],
    chain: &[FrameLoc],
    max_deltas: usize,
    packs: &ChainPacks,
    coder: &mut Coder<'_>,
    base: &mut Vec<u8>,
) -> Option<Candidate> {
    let mut chosen = None;
    let mut version = vec![0u8; page.len()];
    for (layer, loc) in chain.iter().take(max_deltas).enumerate() {
        let Some(frame) = packs.get(&loc.pack).and_then(|p| p.frame(loc.frame)) else {
            break;
        };
        let decoded = pack::layer_payload(frame, layer, WHAT)
            .and_then(|(encoding, payload)| coder.decode(encoding, payload, &mut version, WHAT));
        if let Err(err) = decoded {
            tracing::warn!("cannot rebase on pack {}: {err:#}", loc.pack.name());
            break;
        }
        let candidate = Candidate {
            layer,
            changed: sparse::changed_words(page, &version),
        };
        if candidate.beats(chosen, max_deltas) {
            chosen = Some(candidate);
            base.clear();
            base.extend_from_slice(&version);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::state::PAGE_SIZE;
    use crate::store::pack::PackBuilder;
    use crate::store::recent::LoadedPack;

    /// Versions 0..=n of a page of counters: each bumps a few of them.
    fn versions(n: usize) -> Vec<Vec<u8>> {
        let mut page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = vec![page.clone()];
        let mut x = 12345u32;
        for _ in 0..n {
            for _ in 0..200 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let at = (x as usize >> 8) % (PAGE_SIZE / 4) * 4;
                page[at] = page[at].wrapping_add(1);
            }
            out.push(page.clone());
        }
        out
    }

    /// A chain of `versions` as one pack: a whole page, then a delta per version (the
    /// encoder's choice).
    fn chain_of(versions: &[Vec<u8>]) -> (Vec<FrameLoc>, ChainPacks) {
        chain_encoded(versions, |_| None)
    }

    /// [`chain_of`], delta `k` (1-based) in the encoding `encoding_of(k)` where it names one.
    fn chain_encoded(
        versions: &[Vec<u8>],
        encoding_of: impl Fn(usize) -> Option<Encoding>,
    ) -> (Vec<FrameLoc>, ChainPacks) {
        let mut coder = Coder::new().unwrap();
        let mut cctx = crate::delta::compressor().unwrap();
        let mut builder = PackBuilder::new(1, &[9; 16], 0);
        let (encoding, payload) = coder.whole(&versions[0]).unwrap();
        builder.push_payload(encoding, &payload).unwrap();
        for (k, pair) in versions.windows(2).enumerate() {
            let (encoding, payload) = match encoding_of(k + 1) {
                Some(encoding) => {
                    let payload = crate::delta::encode_payload(
                        &mut cctx,
                        encoding,
                        &pair[1],
                        &pair[0],
                        &mut Vec::new(),
                    )
                    .unwrap();
                    (encoding, payload)
                }
                None => coder
                    .best_delta(&pair[1], &pair[0], false)
                    .unwrap()
                    .unwrap(),
            };
            builder.push_payload(encoding, &payload).unwrap();
        }
        let frames = builder.frames();
        let bytes = Bytes::from(builder.finish());
        let pack_ref = PackRef {
            generation: 1,
            writer_id: [9; 16],
            frames,
            bytes: bytes.len() as u64,
        };
        let pack = Arc::new(LoadedPack::parse(&pack_ref, bytes).unwrap());
        let pack_ref = Arc::new(pack_ref);
        let chain = (0..frames)
            .map(|frame| FrameLoc {
                pack: pack_ref.clone(),
                frame,
                len: 0,
            })
            .collect();
        let packs = ChainPacks::from([((*pack_ref).clone(), pack)]);
        (chain, packs)
    }

    /// Rebuild a page from `keep` frames of `chain` and the new frame on top.
    fn rebuild(
        chain: &[FrameLoc],
        packs: &ChainPacks,
        keep: usize,
        frame: (Encoding, Vec<u8>),
    ) -> Vec<u8> {
        let mut coder = Coder::new().unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut builder = PackBuilder::new(2, &[9; 16], 0);
        builder.push_payload(frame.0, &frame.1).unwrap();
        let new = builder.finish();
        let new_frame = &new[pack::PACK_HEADER_LEN..];
        let frames = chain[..keep]
            .iter()
            .map(|loc| packs[&*loc.pack].frame(loc.frame).unwrap())
            .chain([new_frame]);
        for (layer, frame) in frames.enumerate() {
            let (encoding, payload) = pack::layer_payload(frame, layer, "t").unwrap();
            coder.decode(encoding, payload, &mut page, "t").unwrap();
        }
        page
    }

    #[test]
    fn without_its_packs_a_full_chain_is_written_whole() {
        let max_deltas = 2;
        let all = versions(max_deltas + 1);
        let (chain, _) = chain_of(&all[..=max_deltas]);
        let mut coder = Coder::new().unwrap();
        let (keep, frame) = best_rebase(
            &all[max_deltas + 1],
            Some(&all[max_deltas]),
            &chain,
            max_deltas,
            &ChainPacks::new(),
            &mut coder,
        )
        .unwrap();
        assert_eq!((keep, frame.0), (0, Encoding::Full));
    }

    #[test]
    fn a_page_rewritten_wholesale_starts_a_new_chain() {
        let max_deltas = 2;
        let all = versions(max_deltas);
        let (chain, packs) = chain_of(&all);
        let noise = crate::delta::noise(99, PAGE_SIZE);
        let mut coder = Coder::new().unwrap();
        let (keep, frame) = best_rebase(
            &noise,
            all.last().map(Vec::as_slice),
            &chain,
            max_deltas,
            &packs,
            &mut coder,
        )
        .unwrap();
        assert_eq!((keep, frame.0), (0, Encoding::Full));
    }

    /// Both walks over `chain`, which rebuilds `versions`: the layer each chooses and the
    /// version it leaves as the base.
    fn both_walks(
        page: &[u8],
        versions: &[Vec<u8>],
        chain: &[FrameLoc],
        packs: &ChainPacks,
        max_deltas: usize,
    ) -> (
        Option<Option<Candidate>>,
        Vec<u8>,
        Option<Candidate>,
        Vec<u8>,
    ) {
        let mut coder = Coder::new().unwrap();
        let top = versions.last().unwrap();
        let (mut down_base, mut up_base) = (Vec::new(), Vec::new());
        let down = walk_down(
            page,
            top,
            chain,
            max_deltas,
            packs,
            &mut coder,
            &mut down_base,
        );
        let up = walk_up(page, chain, max_deltas, packs, &mut coder, &mut up_base);
        if let Some(Candidate { layer, changed }) = up {
            assert_eq!(
                up_base, versions[layer],
                "the walk up's base is its layer's version"
            );
            assert_eq!(changed, sparse::changed_words(page, &versions[layer]));
        }
        (down, down_base, up, up_base)
    }

    #[test]
    fn walking_down_from_the_top_chooses_what_walking_up_chooses() {
        use Encoding::{SparseDelta, SubDelta, XorDelta};
        let mut x = 99u32;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            x >> 8
        };
        // Several kinds of chains and pages: some near a low layer, some near the top,
        // one equally near two layers (the tie goes to the lower one both ways).
        for round in 0..24 {
            let max_deltas = 2 + round % 7;
            // Some chains longer than a full one (`max_deltas` lowered since they were
            // written): their top layers are walked through but not candidates.
            let deltas = max_deltas + round % 3;
            let mut versions = vec![crate::delta::noise(round as u64, PAGE_SIZE)];
            for _ in 0..deltas {
                let mut v = versions.last().unwrap().clone();
                for _ in 0..next() % 600 {
                    let at = (next() as usize % (PAGE_SIZE / 4)) * 4;
                    let word = u32::from_le_bytes(v[at..at + 4].try_into().unwrap());
                    let word = match next() % 3 {
                        0 => word.wrapping_add(1),
                        1 => word ^ 0x8000_0000,
                        _ => next(),
                    };
                    v[at..at + 4].copy_from_slice(&word.to_le_bytes());
                }
                versions.push(v);
            }
            let near = next() as usize % versions.len();
            let mut page = versions[near].clone();
            if round % 4 != 3 {
                for _ in 0..next() % 300 {
                    let at = (next() as usize % (PAGE_SIZE / 4)) * 4;
                    page[at] ^= 1;
                }
            } else {
                // Versions 0 and 1 equal: a tie between layers 0 and 1 if the page is nearest them.
                versions[1] = versions[0].clone();
                page = versions[0].clone();
            }
            let kinds = [SparseDelta, XorDelta, SubDelta];
            let (chain, packs) =
                chain_encoded(&versions, |k| Some(kinds[(k + round) % kinds.len()]));
            let (down, down_base, up, up_base) =
                both_walks(&page, &versions, &chain, &packs, max_deltas);
            assert_eq!(down, Some(up), "round {round}");
            assert_eq!(down_base, up_base, "round {round}");
            assert!(up.is_some());
        }
    }

    #[test]
    fn a_chain_with_a_prefix_delta_or_an_unreadable_frame_is_walked_up() {
        let max_deltas = 3;
        let all = versions(max_deltas);
        let page = &versions(max_deltas + 1)[max_deltas + 1];
        let (chain, packs) = chain_encoded(&all, |k| (k == 2).then_some(Encoding::PrefixDelta));
        let (down, _, up, _) = both_walks(page, &all, &chain, &packs, max_deltas);
        assert_eq!(down, None, "a prefix delta does not run backwards");
        assert!(up.is_some());

        // The top's pack missing: the walk down cannot start, the walk up still chooses.
        let (chain, packs) = chain_of(&all);
        let mut split = chain.clone();
        let other = Arc::new(PackRef {
            generation: 7,
            ..(*chain[0].pack).clone()
        });
        split[max_deltas].pack = other;
        let (down, _, up, _) = both_walks(page, &all, &split, &packs, max_deltas);
        assert_eq!(down, None);
        assert!(up.is_some());

        // Its whole page's pack missing: neither walk rebases, the page goes whole.
        let mut no_bottom = chain.clone();
        no_bottom[0].pack = split[max_deltas].pack.clone();
        let (down, _, up, _) = both_walks(page, &all, &no_bottom, &packs, max_deltas);
        assert_eq!((down, up), (None, None));
        let mut coder = Coder::new().unwrap();
        let top = Some(&all[max_deltas][..]);
        let rebased = best_rebase(page, top, &no_bottom, max_deltas, &packs, &mut coder).unwrap();
        assert_eq!((rebased.0, rebased.1.0), (0, Encoding::Full));

        // A page of part words (every page is whole words; this is the guard).
        let short = PAGE_SIZE - 2;
        assert_eq!(
            walk_down(
                &page[..short],
                &all[max_deltas][..short],
                &chain,
                max_deltas,
                &packs,
                &mut coder,
                &mut Vec::new()
            ),
            None,
            "a page of part words is walked up"
        );
    }

    #[test]
    fn a_full_chain_of_small_changes_is_rebased_the_same_from_the_top_or_the_store() {
        for max_deltas in [4, 6] {
            let all = versions(max_deltas + 1);
            let (chain, packs) = chain_of(&all[..=max_deltas]);
            let newest = &all[max_deltas + 1];
            let mut coder = Coder::new().unwrap();
            let top = Some(&all[max_deltas][..]);
            let from_top = best_rebase(newest, top, &chain, max_deltas, &packs, &mut coder);
            let from_top = from_top.unwrap();
            let from_store = best_rebase(newest, None, &chain, max_deltas, &packs, &mut coder);
            assert_eq!(from_top, from_store.unwrap());
            let (down, ..) = both_walks(newest, &all[..=max_deltas], &chain, &packs, max_deltas);
            assert!(down.is_some(), "a chain of sparse deltas is walked down");
            let (keep, frame) = from_top;
            assert!(
                frame.0.is_delta(),
                "small changes rebase rather than restart"
            );
            assert!((1..=max_deltas).contains(&keep), "kept {keep}");
            assert_eq!(&rebuild(&chain, &packs, keep, frame), newest);
        }
    }
}
