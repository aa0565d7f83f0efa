//! Encode: turn a capture into one pack and the next page table, off the guest's thread.
//!
//! - Each dirty page becomes a delta against its previous version (the smallest of XOR,
//!   the changed words alone, or zstd with the previous version as prefix) when the delta
//!   compresses clearly smaller than the whole page and the page's chain has room (at
//!   most `max_deltas`, 8 by default); otherwise a whole page, which starts a new chain.
//! - A full chain is *rebased* (`rebase`): the new version becomes a delta against the
//!   version an earlier layer of the chain rebuilds, and the layers above it are dropped;
//!   the whole page is one more candidate. A page that changes a little at every
//!   checkpoint thus keeps paying deltas, not a whole page every `max_deltas + 1`.
//! - Compaction: a pack of which under a quarter of the frames and of the bytes are still
//!   live has those frames copied, byte for byte, into the new pack, so the old one can
//!   be pruned and the store stays proportional to the guest's memory, not to its
//!   history; past `MANY_PACKS` packs the emptiest are merged, bounding what a restore
//!   reads.
//! - Frames are ordered by (memory, layer, page), so the manifest's runs stay few.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use anyhow::Result;

use super::capture::{Capture, CapturedPage};
use super::kv::EncodedKv;
use super::pages::page_count;
use super::rebase::{self, ChainPacks};
use super::table::{FrameLoc, KvRunLoc, PageTable};
use crate::delta::{Coder, Encoding};
use crate::store::manifest::PackRef;
use crate::store::pack::{self, PackBuilder};
use crate::store::recent::LoadedPack;

/// A delta at most this big is taken without also compressing the whole page.
const SMALL_DELTA: usize = 2048;

/// A live fraction of a pack's frames and bytes below 1 / `COMPACT_BELOW` makes it a
/// compaction candidate.
const COMPACT_BELOW: u32 = 4;

/// Past this many packs in a checkpoint (what a restore reads), the emptiest are merged.
const MANY_PACKS: usize = 128;

/// A dirty page, compressed.
pub struct EncodedPage {
    pub memory: usize,
    pub page: u32,
    /// A whole page (`keep` is 0) or a delta against what the first `keep` frames of the
    /// page's chain rebuild.
    pub encoding: Encoding,
    /// How many frames of the page's chain the new frame stands on: all of them for a
    /// plain delta, fewer for a rebased one, none for a whole page.
    pub keep: usize,
    pub payload: Vec<u8>,
}

/// Compress every dirty page, on all cores, or `beside_guest` on every core but the
/// running guest's; `table` gives each page's chain, and `packs` the packs its frames are
/// in where a full chain is to be rebased.
pub fn encode_pages(
    pages: &[CapturedPage],
    table: &PageTable,
    max_deltas: usize,
    packs: &ChainPacks,
    beside_guest: bool,
) -> Result<Vec<EncodedPage>> {
    // Held until the encoders are done: the process's allowance bounds them.
    let helpers = match beside_guest {
        true => super::parallel::Helpers::take_beside_guest(),
        false => super::parallel::Helpers::take(),
    };
    let per_thread = pages.len().div_ceil(helpers.threads()).max(16);
    let encode_chunk = |chunk: &[CapturedPage]| -> Result<Vec<EncodedPage>> {
        crate::delta::with_coder(|coder| {
            chunk
                .iter()
                .map(|page| {
                    let chain = table.memories[page.memory]
                        .chains
                        .get(page.page as usize)
                        .map_or(&[][..], Vec::as_slice);
                    encode_page(page, chain, max_deltas, packs, coder)
                })
                .collect()
        })
    };
    if pages.len() <= per_thread {
        drop(helpers);
        return encode_chunk(pages);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = pages
            .chunks(per_thread)
            .map(|chunk| scope.spawn(move || encode_chunk(chunk)))
            .collect();
        let mut out = Vec::with_capacity(pages.len());
        for worker in workers {
            out.extend(worker.join().expect("page encoder panicked")?);
        }
        Ok(out)
    })
}

/// A delta on top of the whole chain while it has room (it must beat the whole page by a
/// fifth, since a whole page also resets the chain a restore has to walk); a rebase once
/// it is full; a whole page when there is no chain or no trusted previous version.
fn encode_page(
    page: &CapturedPage,
    chain: &[FrameLoc],
    max_deltas: usize,
    packs: &ChainPacks,
    coder: &mut Coder<'_>,
) -> Result<EncodedPage> {
    let (keep, (encoding, payload)) = match &page.base {
        _ if chain.is_empty() || max_deltas == 0 => (0, coder.whole(&page.bytes)?),
        Some(base) if chain.len() <= max_deltas => {
            match coder.best_delta(&page.bytes, base, chain.len() == 1)? {
                // Rewritten with bytes its previous version does not hold.
                None => (0, coder.whole(&page.bytes)?),
                Some(delta) => {
                    // The chain's own whole page stands in for this version's (as in `rebase`):
                    // compressing the whole page, 2-10x a delta's cost, only to see the delta
                    // win, was most of the committer's time on the window guest.
                    let whole_estimate =
                        (chain[0].len as usize).saturating_sub(pack::FRAME_HEADER_LEN);
                    if delta.1.len() <= SMALL_DELTA || delta.1.len() * 5 < whole_estimate * 4 {
                        (chain.len(), delta)
                    } else {
                        let whole = coder.whole(&page.bytes)?;
                        if delta.1.len() * 5 < whole.1.len() * 4 {
                            (chain.len(), delta)
                        } else {
                            (0, whole)
                        }
                    }
                }
            }
        }
        _ if chain.len() > max_deltas => {
            let top = page.base.as_deref();
            rebase::best_rebase(&page.bytes, top, chain, max_deltas, packs, coder)?
        }
        _ => (0, coder.whole(&page.bytes)?),
    };
    Ok(EncodedPage {
        memory: page.memory,
        page: page.page,
        encoding,
        keep,
        payload,
    })
}

/// What a checkpoint's pack holds, for the statistics.
#[derive(Clone, Debug, Default)]
pub struct PackContents {
    pub delta_pages: usize,
    /// Of the deltas, those of full chains, against an earlier layer's version.
    pub rebased_pages: usize,
    pub whole_pages: usize,
    /// Frames copied from sparse older packs.
    pub compacted_frames: usize,
    pub compacted_bytes: usize,
    /// Bytes of the encoded dirty pages (frames included, compaction not).
    pub encoded_bytes: usize,
    /// Bytes of a component's kv runs (frames included), after the pages.
    pub kv_bytes: usize,
}

/// The pack a checkpoint writes (if any frame) and the table once it is committed.
pub struct Assembled {
    pub pack: Option<(Arc<PackRef>, Vec<u8>)>,
    pub table: PageTable,
    pub contents: PackContents,
}

enum Source {
    Fresh(Encoding, Vec<u8>),
    Copied { pack: usize, frame: Range<usize> },
}

/// The packs to compact now: those of which under a quarter of the frames *and* under a
/// quarter of the bytes are live, but only once their dead bytes add up to the live bytes
/// of the whole table (so sparse packs can at most double the store). Waiting for that
/// much garbage keeps the copying amortised: a compaction copies under a third of the
/// garbage it frees, and cold pages copied into a new pack are not copied again as soon
/// as that pack looks sparse too.
///
/// Each measure alone misjudges mixed packs. By frames, a pack whose one live frame is a
/// big page and whose dead ones are small deltas looks sparse, though copying it frees
/// little (the window guest's ring: 26 % of its bytes were such copies). By bytes, small
/// live deltas beside big dead whole pages look sparse, and once copied they sit beside
/// the next short-lived whole pages, to be copied again (the C sessions guest recopied
/// one chain every other checkpoint, 10 % more bytes).
///
/// A restore reads every pack the table names, so their number is bounded too: past
/// `MANY_PACKS`, the packs with the fewest live bytes (the cheapest to copy) are merged
/// until `MANY_PACKS / 2` remain, which buys as many checkpoints before the next merge.
///
/// A component's kv runs count as live frames of their packs, and move with them.
fn sparse_packs(table: &PageTable, generation: u64, fresh_bytes: u64) -> HashSet<PackRef> {
    let mut live_bytes = fresh_bytes;
    let mut dead_bytes = 0;
    // (live bytes, pack): sparse by both measures, and the others.
    let (mut sparse, mut others) = (Vec::new(), Vec::new());
    for (pack, (frames, bytes)) in table.live_frames() {
        if pack.generation >= generation {
            continue; // this checkpoint's own pack, still being built
        }
        let bytes = bytes.min(pack.bytes);
        live_bytes += bytes;
        if frames * COMPACT_BELOW < pack.frames && bytes * u64::from(COMPACT_BELOW) < pack.bytes {
            dead_bytes += pack.bytes - bytes;
            sparse.push((bytes, pack));
        } else {
            others.push((bytes, pack));
        }
    }
    let mut candidates = HashSet::new();
    if dead_bytes > 0 && dead_bytes >= live_bytes {
        candidates.extend(sparse.into_iter().map(|(_, pack)| pack));
    } else {
        others.append(&mut sparse);
    }
    if others.len() > MANY_PACKS {
        others.sort_unstable_by_key(|(bytes, pack)| (*bytes, pack.generation));
        let merge = others.len() - MANY_PACKS / 2;
        candidates.extend(others.drain(..merge).map(|(_, pack)| pack));
    }
    candidates
}

/// Build the pack for `generation` from the encoded pages and kv runs, compacting sparse
/// packs (read with `fetch`), and the table that results.
pub fn assemble(
    generation: u64,
    writer_id: &[u8; 16],
    table: &PageTable,
    capture: &Capture,
    encoded: Vec<EncodedPage>,
    kv: Option<EncodedKv>,
    fetch: &mut dyn FnMut(&PackRef) -> Result<Arc<LoadedPack>>,
) -> Result<Assembled> {
    let mut next = table.clone();
    let kv_runs = match kv {
        Some(kv) if kv.keep > next.kv_runs.len() => anyhow::bail!(
            "a kv update keeps {} runs of a chain of {}",
            kv.keep,
            next.kv_runs.len()
        ),
        Some(kv) => {
            next.kv_runs.truncate(kv.keep);
            kv.runs
        }
        None => Vec::new(),
    };
    let kv_frames: usize = kv_runs.iter().map(|run| run.chunks.len()).sum();
    let kv_bytes: usize = kv_runs
        .iter()
        .flat_map(|run| &run.chunks)
        .map(|chunk| chunk.len() + pack::FRAME_HEADER_LEN)
        .sum();
    for (memory, captured) in next.memories.iter_mut().zip(&capture.memories) {
        memory.byte_len = captured.byte_len;
        memory
            .chains
            .resize(page_count(captured.byte_len), Vec::new());
    }
    for &(memory, page) in &capture.zeroed {
        next.memories[memory].chains[page as usize].clear();
    }

    // (memory, layer, page, where the frame's bytes come from)
    let mut frames: Vec<(usize, usize, u32, Source)> = Vec::with_capacity(encoded.len());
    let mut contents = PackContents::default();
    for page in encoded {
        let chain = &mut next.memories[page.memory].chains[page.page as usize];
        if page.encoding.is_delta() {
            contents.delta_pages += 1;
            if page.keep < chain.len() {
                contents.rebased_pages += 1;
            }
        } else {
            contents.whole_pages += 1;
        }
        chain.truncate(page.keep);
        contents.encoded_bytes += page.payload.len() + pack::FRAME_HEADER_LEN;
        frames.push((
            page.memory,
            chain.len(),
            page.page,
            Source::Fresh(page.encoding, page.payload),
        ));
        // A placeholder until the pack's frame numbers are known.
        chain.push(FrameLoc {
            pack: Arc::new(PackRef {
                generation,
                writer_id: *writer_id,
                frames: 0,
                bytes: 0,
            }),
            frame: u32::MAX,
            len: 0,
        });
    }

    // Compaction: copy the live frames of sparse packs.
    let sparse = sparse_packs(&next, generation, contents.encoded_bytes as u64);
    let mut fetched: Vec<Arc<LoadedPack>> = Vec::new();
    let mut index_of = HashMap::new();
    if !sparse.is_empty() {
        let mut sparse: Vec<PackRef> = sparse.into_iter().collect();
        sparse.sort_by_key(|p| p.generation);
        for pack_ref in &sparse {
            index_of.insert(pack_ref.clone(), fetched.len());
            fetched.push(fetch(pack_ref)?);
        }
        for (memory, table) in next.memories.iter().enumerate() {
            for (page, chain) in table.chains.iter().enumerate() {
                for (layer, loc) in chain.iter().enumerate() {
                    if let Some(&pack) = index_of.get(&*loc.pack) {
                        let range = fetched[pack]
                            .index
                            .frames
                            .get(loc.frame as usize)
                            .cloned()
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "pack {} is corrupt: it has no frame {}",
                                    loc.pack.name(),
                                    loc.frame
                                )
                            })?;
                        contents.compacted_frames += 1;
                        contents.compacted_bytes += range.len();
                        frames.push((
                            memory,
                            layer,
                            page as u32,
                            Source::Copied { pack, frame: range },
                        ));
                    }
                }
            }
        }
    }
    // Kv runs kept from sparse packs move too, frame for frame: (run, pack, frames, bytes).
    let mut kv_moves: Vec<(usize, usize, Vec<Range<usize>>, usize)> = Vec::new();
    let mut kv_frames = kv_frames;
    for (index, run) in next.kv_runs.iter().enumerate() {
        let Some(&pack) = index_of.get(&*run.pack) else {
            continue;
        };
        let ranges = (run.first_frame..run.first_frame.saturating_add(run.frames))
            .map(|frame| {
                fetched[pack]
                    .index
                    .frames
                    .get(frame as usize)
                    .cloned()
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "pack {} is corrupt: it has no frame {frame}",
                            run.pack.name()
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let moved: usize = ranges.iter().map(Range::len).sum();
        contents.compacted_frames += ranges.len();
        contents.compacted_bytes += moved;
        kv_frames += ranges.len();
        kv_moves.push((index, pack, ranges, moved));
    }
    if frames.is_empty() && kv_runs.is_empty() && kv_moves.is_empty() {
        return Ok(Assembled {
            pack: None,
            table: next,
            contents,
        });
    }

    frames.sort_by_key(|(memory, layer, page, _)| (*memory, *layer, *page));
    contents.kv_bytes = kv_bytes;
    let capacity = contents.encoded_bytes + contents.compacted_bytes + kv_bytes;
    let new_pack = Arc::new(PackRef {
        generation,
        writer_id: *writer_id,
        frames: u32::try_from(frames.len() + kv_frames)?,
        bytes: (pack::PACK_HEADER_LEN + capacity) as u64,
    });
    let mut builder = PackBuilder::new(generation, writer_id, capacity);
    for (memory, layer, page, source) in frames {
        let (frame, len) = match source {
            Source::Fresh(encoding, payload) => (
                builder.push_payload(encoding, &payload)?,
                pack::FRAME_HEADER_LEN + payload.len(),
            ),
            Source::Copied { pack, frame } => (
                builder.push_frame(
                    &fetched[pack].bytes[frame.clone()],
                    "a frame being compacted",
                )?,
                frame.len(),
            ),
        };
        next.memories[memory].chains[page as usize][layer] = FrameLoc {
            pack: new_pack.clone(),
            frame,
            len: u32::try_from(len)?,
        };
    }
    // The kv runs after the pages, each run's frames consecutive: those moved, then new.
    for (index, pack, ranges, moved) in kv_moves {
        let mut first_frame = None;
        for range in ranges {
            let frame =
                builder.push_frame(&fetched[pack].bytes[range], "a kv frame being compacted")?;
            first_frame.get_or_insert(frame);
        }
        let run = &mut next.kv_runs[index];
        run.pack = new_pack.clone();
        run.first_frame = first_frame.unwrap_or(0);
        run.stored = moved as u64;
    }
    for run in kv_runs {
        let mut first_frame = None;
        for chunk in &run.chunks {
            let frame = builder.push_payload(Encoding::KvChunk, chunk)?;
            first_frame.get_or_insert(frame);
        }
        next.kv_runs.push(KvRunLoc {
            pack: new_pack.clone(),
            first_frame: first_frame.unwrap_or(0),
            frames: u32::try_from(run.chunks.len())?,
            bytes: run.bytes,
            stored: run
                .chunks
                .iter()
                .map(|chunk| (chunk.len() + pack::FRAME_HEADER_LEN) as u64)
                .sum(),
        });
    }
    let bytes = builder.finish();
    debug_assert_eq!(bytes.len() as u64, new_pack.bytes);
    Ok(Assembled {
        pack: Some((new_pack, bytes)),
        table: next,
        contents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::table::MemoryTable;

    /// A pack of `frames` frames and `bytes` bytes, written at `generation`.
    fn pack(generation: u64, frames: u32, bytes: u64) -> Arc<PackRef> {
        Arc::new(PackRef {
            generation,
            writer_id: [1; 16],
            frames,
            bytes,
        })
    }

    /// A table with one page per live frame: `(pack, frame lengths still in use)`.
    fn table(live: &[(&Arc<PackRef>, &[u32])]) -> PageTable {
        let chains = live
            .iter()
            .flat_map(|(pack, lens)| {
                lens.iter().enumerate().map(|(frame, len)| {
                    vec![FrameLoc {
                        pack: (*pack).clone(),
                        frame: frame as u32,
                        len: *len,
                    }]
                })
            })
            .collect();
        PageTable {
            memories: vec![MemoryTable {
                byte_len: 0,
                chains,
            }],
            kv_runs: Vec::new(),
        }
    }

    /// A page rewritten after a whole version: with new bytes, whole again, its chain reset
    /// (through the survey's `None`: what a losing delta led to, without compressing one);
    /// with the old bytes moved, a delta on top of the chain.
    #[test]
    fn a_page_rewritten_with_new_bytes_goes_whole_and_with_moved_bytes_as_a_delta() {
        let size = crate::state::PAGE_SIZE;
        let old = crate::delta::noise(21, size);
        let chain = [FrameLoc {
            pack: pack(1, 1, size as u64),
            frame: 0,
            len: size as u32,
        }];
        let mut coder = Coder::new().unwrap();
        let moved = [&old[3..], &old[..3]].concat();
        for (bytes, expected) in [
            (crate::delta::noise(22, size), (0, Encoding::Full)),
            (moved, (1, Encoding::PrefixDelta)),
        ] {
            let page = CapturedPage {
                memory: 0,
                page: 0,
                bytes,
                previous_hash: None,
                written_parts: u16::MAX,
                base: Some(old.clone()),
            };
            let encoded = encode_page(&page, &chain, 8, &ChainPacks::new(), &mut coder).unwrap();
            assert_eq!((encoded.keep, encoded.encoding), expected);
        }
    }

    #[test]
    fn a_pack_is_compacted_only_when_sparse_by_frames_and_by_bytes() {
        // One big live page among eight dead small deltas: sparse by frames only.
        let big_live = pack(1, 9, 40_000);
        // Two small live deltas beside two dead whole pages: sparse by bytes only.
        let small_live = pack(2, 4, 60_000);
        // One small live frame of eight, the rest dead: sparse both ways.
        let empty = pack(3, 8, 200_000);
        let live = table(&[
            (&big_live, &[30_000]),
            (&small_live, &[500, 500]),
            (&empty, &[1_000]),
        ]);
        let chosen = sparse_packs(&live, 10, 0);
        assert_eq!(chosen, HashSet::from([(*empty).clone()]));

        // Too little garbage yet to be worth a copy: nothing.
        let live = table(&[(&big_live, &[30_000]), (&pack(3, 8, 20_000), &[1_000])]);
        assert!(sparse_packs(&live, 10, 0).is_empty());
    }

    #[test]
    fn past_many_packs_the_emptiest_are_merged() {
        let packs: Vec<_> = (1..=MANY_PACKS as u64 + 10)
            .map(|g| pack(g, 1, 1_000 + g))
            .collect();
        let lens: Vec<[u32; 1]> = packs.iter().map(|p| [p.bytes as u32]).collect();
        let live: Vec<_> = packs.iter().zip(&lens).map(|(p, l)| (p, &l[..])).collect();
        let chosen = sparse_packs(&table(&live), 1_000, 0);
        // Fully live packs, no garbage: merged only for their number, smallest first.
        assert_eq!(chosen.len(), packs.len() - MANY_PACKS / 2);
        let kept_smallest = packs
            .iter()
            .filter(|p| !chosen.contains(p))
            .map(|p| p.bytes)
            .min()
            .unwrap();
        assert!(chosen.iter().all(|p| p.bytes < kept_smallest));
        // Under the bound, nothing.
        let live = table(&live[..MANY_PACKS]);
        assert!(sparse_packs(&live, 1_000, 0).is_empty());
    }

    /// A sparse pack that also holds a kv run: compaction copies the live page and the
    /// run into the new pack, and the run still reads back from there.
    #[test]
    fn compaction_moves_a_kv_run_with_the_live_pages() {
        use crate::snapshot::capture::{Capture, CapturedMemory};
        use crate::snapshot::table::KvRunLoc;
        let writer = [1; 16];
        let mut coder = crate::delta::Coder::new().unwrap();
        let mut builder = PackBuilder::new(1, &writer, 0);
        // Frame 0: a live page that compresses well; frames 1-15: dead noisy pages.
        let mut noise = 0x9E37_79B9_7F4A_7C15u64;
        for frame in 0..16 {
            let page: Vec<u8> = (0..crate::state::PAGE_SIZE)
                .map(|i| {
                    if frame == 0 {
                        (i % 7) as u8
                    } else {
                        noise ^= noise << 13;
                        noise ^= noise >> 7;
                        noise ^= noise << 17;
                        noise as u8
                    }
                })
                .collect();
            let (encoding, payload) = coder.whole(&page).unwrap();
            builder.push_payload(encoding, &payload).unwrap();
        }
        let run = b"\x01\xff\x00".repeat(30_000);
        let update = crate::component::kv_runs::KvUpdate {
            keep: 0,
            runs: vec![run.clone()],
        };
        let chunks = super::super::kv::encode_runs(&update)
            .unwrap()
            .runs
            .remove(0);
        for chunk in &chunks.chunks {
            builder.push_payload(Encoding::KvChunk, chunk).unwrap();
        }
        let old_bytes = bytes::Bytes::from(builder.finish());
        let old = Arc::new(PackRef {
            generation: 1,
            writer_id: writer,
            frames: 16 + chunks.chunks.len() as u32,
            bytes: old_bytes.len() as u64,
        });
        let loaded = Arc::new(LoadedPack::parse(&old, old_bytes).unwrap());
        let frame_len = |f: u32| loaded.frame(f).unwrap().len() as u32;
        let table = PageTable {
            memories: vec![MemoryTable {
                byte_len: crate::state::PAGE_SIZE as u64,
                chains: vec![vec![FrameLoc {
                    pack: old.clone(),
                    frame: 0,
                    len: frame_len(0),
                }]],
            }],
            kv_runs: vec![KvRunLoc {
                pack: old.clone(),
                first_frame: 16,
                frames: chunks.chunks.len() as u32,
                bytes: run.len() as u64,
                stored: (16..old.frames).map(|f| u64::from(frame_len(f))).sum(),
            }],
        };
        let capture = Capture {
            globals: vec![],
            host_state: vec![],
            kv: None,
            memories: vec![CapturedMemory {
                byte_len: crate::state::PAGE_SIZE as u64,
                digest: 0,
            }],
            dirty: vec![],
            zeroed: vec![],
            hashed_pages: 0,
            kernel_tracked_memories: 0,
        };
        let assembled = assemble(5, &writer, &table, &capture, vec![], None, &mut |_| {
            Ok(loaded.clone())
        })
        .unwrap();
        let (new_pack, bytes) = assembled.pack.expect("the sparse pack was compacted");
        assert_eq!(assembled.contents.compacted_frames, 1 + chunks.chunks.len());
        let next = assembled.table;
        assert_eq!(next.memories[0].chains[0][0].pack, new_pack);
        assert_eq!(next.kv_runs[0].pack, new_pack);
        assert!(
            !next.live_frames().contains_key(&*old),
            "nothing holds the old pack"
        );
        let packs = std::collections::HashMap::from([(
            (*new_pack).clone(),
            LoadedPack::parse(&new_pack, bytes.into()).unwrap(),
        )]);
        assert_eq!(
            super::super::kv::read_run(&next.kv_runs[0], &packs).unwrap(),
            run
        );
    }
}
