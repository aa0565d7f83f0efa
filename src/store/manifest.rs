//! Manifests: one object per committed checkpoint that says everything a restore needs,
//! with no chain to walk: the whole page table, the globals, the memory sizes, the
//! module's SHA-256, and the stream positions (input offset, output flush marker) that
//! the commit binds to that state. The byte layout is specified in `docs/FORMAT.md`.

use anyhow::{Context, Result, bail};

use crate::codec::{Put, Reader};
use crate::error::corrupt;
use crate::state::GlobalValue;

pub const MANIFEST_MAGIC: &[u8; 8] = b"WASNAPMF";
pub const MANIFEST_VERSION: u16 = 3;
/// Version 4 is version 3 plus a component's host state at the end; written only when
/// there is one, so core modules' manifests stay readable by older wasnaps.
pub const MANIFEST_VERSION_4: u16 = 4;
/// Version 2 had no stream positions, only the two byte counts; it is still read (its
/// positions are the counts as varints, which is what the file input and output use).
const MANIFEST_VERSION_2: u16 = 2;
/// magic, version, flags, stored body length, raw body length.
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 4;
const FLAG_BODY_ZSTD: u16 = 1;
/// A manifest body larger than this is refused rather than allocated.
const MAX_BODY_LEN: usize = 1 << 30;
/// More layers than this (a whole page and its deltas) is refused as corrupt.
pub const MAX_LAYERS: usize = 64;
/// The most bytes and runs a manifest's kv chain may have (see `component::kv_runs`).
const MAX_KV_CHAIN_BYTES: u64 = crate::component::kv_runs::MAX_CHAIN_BYTES;
const MAX_KV_RUNS: usize = crate::component::kv_runs::MAX_RUNS;
/// The largest memory a manifest may describe: what a 64-bit memory can address in
/// wasmtime, less a page, so that every page number and run end fits in 32 bits.
pub const MAX_MEMORY_BYTES: u64 = (1 << 48) - (1 << 16);

/// A pack the manifest's page table refers to. Its object name follows from it
/// (`store::pack_name`), and `frames` from its header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PackRef {
    pub generation: u64,
    pub writer_id: [u8; 16],
    /// How many frames the pack holds.
    pub frames: u32,
    /// The pack's size in bytes.
    pub bytes: u64,
}

impl PackRef {
    pub fn name(&self) -> String {
        super::pack_name(self.generation, &self.writer_id)
    }
}

/// Consecutive pages whose frames are consecutive in one pack: pages
/// `first_page .. first_page + pages` are frames `first_frame ..` of `packs[pack]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first_page: u32,
    pub pages: u32,
    pub pack: u32,
    pub first_frame: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryManifest {
    pub byte_len: u64,
    /// XXH3-64 over the memory's page hashes (see `snapshot::pages::memory_digest`).
    pub digest: u64,
    /// Layer 0: the whole-page frame of every non-zero page (a page not in it is zero).
    /// Layer k > 0: the k-th XOR delta on top, for the pages whose chain is that long.
    /// Each layer is a list of runs in ascending page order.
    pub layers: Vec<Vec<Run>>,
}

/// One run of a component's kv chain (docs/FORMAT.md, "Kv runs"): `frames` consecutive
/// frames of `packs[pack]` from `first_frame`, `bytes` bytes once decompressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRun {
    pub pack: u32,
    pub first_frame: u32,
    pub frames: u32,
    pub bytes: u64,
}

/// Where the guest was when the checkpoint was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// A record guest, between two records.
    Records,
    /// A stdio program not started yet: call `_start`.
    ProgramStart,
    /// A stdio program unwound at a stdin read, its stack saved at this address of
    /// memory 0: rewind to go on.
    ProgramSuspended { unwind_data: u32 },
    /// A stdio program that ended, with this exit status.
    ProgramExited(i32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub generation: u64,
    pub writer_id: [u8; 16],
    pub module_sha256: [u8; 32],
    /// Input bytes consumed by records whose `process` call finished.
    pub input_offset: u64,
    /// Output bytes made durable at this checkpoint; a restore cuts the output back to it.
    pub output_marker: u64,
    /// Where the input goes on, in the source's own terms (`stream::Source::position`):
    /// opaque to the engine, handed back to the source on restore.
    pub input_position: Vec<u8>,
    /// What the output committed, in the sink's own terms (`stream::Sink::checkpoint`).
    pub output_position: Vec<u8>,
    pub random_seed: u64,
    /// Bytes of the WASI random stream the guest had drawn.
    pub random_position: u64,
    pub created_unix_ms: u64,
    pub run_state: RunState,
    /// The packs the page table refers to.
    pub packs: Vec<PackRef>,
    pub globals: Vec<GlobalValue>,
    pub memories: Vec<MemoryManifest>,
    /// What the host keeps for a component (a summary of its kv state, the handle table,
    /// watermarks; see `component::instance`); empty for a core module.
    pub host_state: Vec<u8>,
    /// A component's kv chain, oldest run first; empty for a core module.
    pub kv_runs: Vec<KvRun>,
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.host_state.is_empty() && self.kv_runs.is_empty() {
            self.encode_as(MANIFEST_VERSION)
        } else {
            self.encode_as(MANIFEST_VERSION_4)
        }
    }

    /// Encode in `version` (3, or 2 for the compatibility tests: without positions).
    fn encode_as(&self, version: u16) -> Result<Vec<u8>> {
        let mut body = Vec::with_capacity(256);
        body.put_varint(self.generation);
        body.extend_from_slice(&self.writer_id);
        body.extend_from_slice(&self.module_sha256);
        body.put_varint(self.input_offset);
        body.put_varint(self.output_marker);
        if version != MANIFEST_VERSION_2 {
            body.put_varint(self.input_position.len() as u64);
            body.extend_from_slice(&self.input_position);
            body.put_varint(self.output_position.len() as u64);
            body.extend_from_slice(&self.output_position);
        }
        body.put_u64(self.random_seed);
        body.put_varint(self.random_position);
        body.put_varint(self.created_unix_ms);
        match self.run_state {
            RunState::Records => body.put_u8(0),
            RunState::ProgramStart => body.put_u8(1),
            RunState::ProgramSuspended { unwind_data } => {
                body.put_u8(2);
                body.put_varint(unwind_data.into());
            }
            RunState::ProgramExited(status) => {
                body.put_u8(3);
                body.put_varint(u64::from(status as u32));
            }
        }
        // Packs name their writer by index into a list of writers: most packs share one.
        let mut writers: Vec<[u8; 16]> = Vec::new();
        let pack_writers: Vec<usize> = self
            .packs
            .iter()
            .map(|p| match writers.iter().position(|w| *w == p.writer_id) {
                Some(i) => i,
                None => {
                    writers.push(p.writer_id);
                    writers.len() - 1
                }
            })
            .collect();
        body.put_varint(writers.len() as u64);
        for writer in &writers {
            body.extend_from_slice(writer);
        }
        body.put_varint(self.packs.len() as u64);
        for (pack, writer) in self.packs.iter().zip(pack_writers) {
            body.put_varint(pack.generation);
            body.put_varint(writer as u64);
            body.put_varint(pack.frames.into());
            body.put_varint(pack.bytes);
        }
        body.put_varint(self.globals.len() as u64);
        for global in &self.globals {
            match *global {
                GlobalValue::I32(v) => {
                    body.put_u8(0);
                    body.put_u32(v as u32)
                }
                GlobalValue::I64(v) => {
                    body.put_u8(1);
                    body.put_u64(v as u64)
                }
                GlobalValue::F32(v) => {
                    body.put_u8(2);
                    body.put_u32(v)
                }
                GlobalValue::F64(v) => {
                    body.put_u8(3);
                    body.put_u64(v)
                }
                GlobalValue::V128(v) => {
                    body.put_u8(4);
                    body.extend_from_slice(&v.to_le_bytes())
                }
            }
        }
        body.put_varint(self.memories.len() as u64);
        for memory in &self.memories {
            body.put_varint(memory.byte_len);
            body.put_u64(memory.digest);
            body.put_varint(memory.layers.len() as u64);
            for layer in &memory.layers {
                body.put_varint(layer.len() as u64);
                let mut next_page = 0u64;
                for run in layer {
                    // Pages as the gap after the previous run: small numbers, short varints.
                    body.put_varint(u64::from(run.first_page) - next_page);
                    body.put_varint(run.pages.into());
                    body.put_varint(run.pack.into());
                    body.put_varint(run.first_frame.into());
                    next_page = u64::from(run.first_page) + u64::from(run.pages);
                }
            }
        }
        if version >= MANIFEST_VERSION_4 {
            body.put_varint(self.host_state.len() as u64);
            body.extend_from_slice(&self.host_state);
            body.put_varint(self.kv_runs.len() as u64);
            for run in &self.kv_runs {
                body.put_varint(run.pack.into());
                body.put_varint(run.first_frame.into());
                body.put_varint(run.frames.into());
                body.put_varint(run.bytes);
            }
        }

        if body.len() > MAX_BODY_LEN {
            bail!(
                "a manifest of {} MiB is more than a reader accepts ({} MiB)",
                body.len() >> 20,
                MAX_BODY_LEN >> 20
            );
        }
        let stored = zstd::bulk::compress(&body, 3)?;
        let mut out = Vec::with_capacity(HEADER_LEN + stored.len() + 4);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.put_u16(version);
        out.put_u16(FLAG_BODY_ZSTD);
        out.put_u32(u32::try_from(stored.len()).context("manifest too large")?);
        out.put_u32(u32::try_from(body.len()).context("manifest too large")?);
        out.extend_from_slice(&stored);
        let crc = crc32fast::hash(&out);
        out.put_u32(crc);
        Ok(out)
    }

    /// Decode and verify a manifest; `what` names the object in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let mut r = Reader::new(bytes, what);
        if &r.array::<8>()? != MANIFEST_MAGIC {
            return Err(corrupt!("{what} is not a wasnap manifest (bad magic)"));
        }
        let version = r.u16()?;
        if ![MANIFEST_VERSION_2, MANIFEST_VERSION, MANIFEST_VERSION_4].contains(&version) {
            return Err(corrupt!(
                "{what} has manifest format version {version}; this wasnap reads versions 2 to {MANIFEST_VERSION_4}"
            ));
        }
        let flags = r.u16()?;
        let stored_len = r.u32()? as usize;
        let raw_len = r.u32()? as usize;
        if stored_len != r.remaining().saturating_sub(4) {
            return Err(corrupt!(
                "{what} is corrupt: its length field does not match its size"
            ));
        }
        let (covered, crc_bytes) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(covered) != u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes")) {
            return Err(corrupt!("{what} is corrupt: checksum mismatch"));
        }
        if flags & !FLAG_BODY_ZSTD != 0 {
            return Err(corrupt!(
                "{what} uses unknown flags {flags:#x} (written by a newer wasnap?)"
            ));
        }
        let stored = r.bytes(stored_len)?;
        let body = if flags & FLAG_BODY_ZSTD != 0 {
            if raw_len > MAX_BODY_LEN {
                return Err(corrupt!(
                    "{what} is corrupt: body length {raw_len} is implausible"
                ));
            }
            let body = zstd::bulk::decompress(stored, raw_len)
                .map_err(|e| corrupt!("{what} is corrupt: body does not decompress: {e}"))?;
            if body.len() != raw_len {
                return Err(corrupt!(
                    "{what} is corrupt: body is {} bytes, header says {raw_len}",
                    body.len()
                ));
            }
            body
        } else {
            stored.to_vec()
        };
        Self::decode_body(&body, version, what)
    }

    fn decode_body(body: &[u8], version: u16, what: &str) -> Result<Self> {
        let mut r = Reader::new(body, what);
        let generation = r.varint()?;
        let writer_id = r.array()?;
        let module_sha256 = r.array()?;
        let input_offset = r.varint()?;
        let output_marker = r.varint()?;
        let (input_position, output_position) = if version == MANIFEST_VERSION_2 {
            (varint_bytes(input_offset), varint_bytes(output_marker))
        } else {
            let n = r.varint_count(1)?;
            let input = r.bytes(n)?.to_vec();
            let n = r.varint_count(1)?;
            (input, r.bytes(n)?.to_vec())
        };
        let random_seed = r.u64()?;
        let random_position = r.varint()?;
        let created_unix_ms = r.varint()?;
        let run_state = match r.u8()? {
            0 => RunState::Records,
            1 => RunState::ProgramStart,
            2 => RunState::ProgramSuspended {
                unwind_data: r.varint_u32()?,
            },
            3 => RunState::ProgramExited(r.varint_u32()? as i32),
            other => return Err(corrupt!("{what} is corrupt: unknown run state {other}")),
        };
        let writers = (0..r.varint_count(16)?)
            .map(|_| r.array::<16>())
            .collect::<Result<Vec<_>>>()?;
        let packs = (0..r.varint_count(4)?)
            .map(|_| {
                let generation = r.varint()?;
                let writer = r.varint()? as usize;
                let frames = r.varint_u32()?;
                let bytes = r.varint()?;
                let writer_id = *writers
                    .get(writer)
                    .ok_or_else(|| corrupt!("{what} is corrupt: a pack names writer #{writer}"))?;
                if bytes > super::pack::max_pack_bytes(frames) || generation > super::MAX_GENERATION {
                    return Err(corrupt!(
                        "{what} is corrupt: it names a pack of generation {generation} with {frames} frames in {bytes} bytes"
                    ));
                }
                Ok(PackRef {
                    generation,
                    writer_id,
                    frames,
                    bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let globals = (0..r.varint_count(5)?)
            .map(|_| {
                Ok(match r.u8()? {
                    0 => GlobalValue::I32(r.u32()? as i32),
                    1 => GlobalValue::I64(r.u64()? as i64),
                    2 => GlobalValue::F32(r.u32()?),
                    3 => GlobalValue::F64(r.u64()?),
                    4 => GlobalValue::V128(u128::from_le_bytes(r.array()?)),
                    other => {
                        return Err(corrupt!("{what} is corrupt: unknown global type {other}"));
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let memories = (0..r.varint_count(10)?)
            .map(|index| {
                let byte_len = r.varint()?;
                if byte_len > MAX_MEMORY_BYTES {
                    return Err(corrupt!("{what} is corrupt: memory {index} claims {byte_len} bytes"));
                }
                let digest = r.u64()?;
                let page_count = crate::state::page_count(byte_len) as u64;
                let layer_count = r.varint_count(1)?;
                if layer_count > MAX_LAYERS {
                    return Err(corrupt!("{what} is corrupt: memory {index} has {layer_count} layers"));
                }
                let mut layers: Vec<Vec<Run>> = Vec::with_capacity(layer_count);
                for depth in 0..layer_count {
                    let mut layer = Vec::new();
                    let mut next_page = 0u64;
                    for _ in 0..r.varint_count(4)? {
                        let first_page = next_page.saturating_add(r.varint()?);
                        let pages = r.varint()?;
                        let pack = r.varint()?;
                        let first_frame = r.varint()?;
                        let end_page = first_page.saturating_add(pages);
                        let fits_pack = packs.get(pack as usize).is_some_and(|p| {
                            first_frame.saturating_add(pages) <= u64::from(p.frames)
                        });
                        if pages == 0 || end_page > page_count || !fits_pack {
                            return Err(corrupt!(
                                "{what} is corrupt: memory {index} layer {depth} has a misplaced run of {pages} pages at page {first_page}"
                            ));
                        }
                        layer.push(Run {
                            first_page: first_page as u32,
                            pages: pages as u32,
                            pack: pack as u32,
                            first_frame: first_frame as u32,
                        });
                        next_page = end_page;
                    }
                    if depth > 0 && !covered_by(&layer, &layers[depth - 1]) {
                        return Err(corrupt!(
                            "{what} is corrupt: memory {index} has a delta on layer {depth} for a page without layer {}",
                            depth - 1
                        ));
                    }
                    layers.push(layer);
                }
                Ok(MemoryManifest {
                    byte_len,
                    digest,
                    layers,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (host_state, kv_runs) = if version >= MANIFEST_VERSION_4 {
            let n = r.varint_count(1)?;
            let host_state = r.bytes(n)?.to_vec();
            let count = r.varint_count(4)?;
            if count > MAX_KV_RUNS {
                return Err(corrupt!("{what} is corrupt: a kv chain of {count} runs"));
            }
            let mut chain_bytes = 0u64;
            let runs = (0..count)
                .map(|index| {
                    let (pack, first_frame, frames, bytes) =
                        (r.varint()?, r.varint()?, r.varint()?, r.varint()?);
                    let fits_pack = packs.get(pack as usize).is_some_and(|p| {
                        first_frame.saturating_add(frames) <= u64::from(p.frames)
                    });
                    let chunks = bytes.div_ceil(crate::snapshot::kv::KV_CHUNK_BYTES as u64);
                    chain_bytes = chain_bytes.saturating_add(bytes);
                    if !fits_pack || bytes == 0 || chain_bytes > MAX_KV_CHAIN_BYTES || frames != chunks {
                        return Err(corrupt!(
                            "{what} is corrupt: kv run {index} of {bytes} bytes is misplaced ({frames} frames from frame {first_frame} of pack #{pack})"
                        ));
                    }
                    Ok(KvRun {
                        pack: pack as u32,
                        first_frame: first_frame as u32,
                        frames: frames as u32,
                        bytes,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (host_state, runs)
        } else {
            (Vec::new(), Vec::new())
        };
        r.finish()?;
        // Every pack listed is one a page or a kv run uses: a restore reads them all.
        let mut used = vec![false; packs.len()];
        for run in memories.iter().flat_map(|m| m.layers.iter().flatten()) {
            used[run.pack as usize] = true;
        }
        for run in &kv_runs {
            used[run.pack as usize] = true;
        }
        if let Some(unused) = used.iter().position(|u| !u) {
            return Err(corrupt!(
                "{what} is corrupt: it lists pack #{unused}, which no page or kv run uses"
            ));
        }
        if generation > super::MAX_GENERATION {
            return Err(corrupt!(
                "{what} is corrupt: generation {generation} is out of range"
            ));
        }
        Ok(Self {
            generation,
            writer_id,
            module_sha256,
            input_offset,
            output_marker,
            input_position,
            output_position,
            random_seed,
            random_position,
            created_unix_ms,
            run_state,
            packs,
            globals,
            memories,
            host_state,
            kv_runs,
        })
    }

    /// Bytes of memory, all memories together.
    pub fn memory_bytes(&self) -> u64 {
        self.memories
            .iter()
            .fold(0u64, |sum, m| sum.saturating_add(m.byte_len))
    }

    /// Non-zero pages in the table, all memories together.
    pub fn stored_pages(&self) -> usize {
        self.memories
            .iter()
            .filter_map(|m| m.layers.first())
            .flatten()
            .map(|run| run.pages as usize)
            .sum()
    }

    /// Frames the page table and the kv runs refer to in each of [`Self::packs`].
    pub fn live_frames(&self) -> Vec<u64> {
        let mut live = vec![0u64; self.packs.len()];
        for run in self.memories.iter().flat_map(|m| m.layers.iter().flatten()) {
            live[run.pack as usize] += u64::from(run.pages);
        }
        for run in &self.kv_runs {
            live[run.pack as usize] += u64::from(run.frames);
        }
        live
    }
}

/// Whether every page of `layer` (ascending, disjoint runs) is also in `below`.
fn varint_bytes(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_varint(v);
    out
}

fn covered_by(layer: &[Run], below: &[Run]) -> bool {
    let mut below = below.iter().peekable();
    for run in layer {
        let (mut page, end) = (run.first_page, run.first_page + run.pages);
        while page < end {
            while below.peek().is_some_and(|b| b.first_page + b.pages <= page) {
                below.next();
            }
            match below.peek() {
                Some(b) if b.first_page <= page => page = (b.first_page + b.pages).min(end),
                _ => return false,
            }
        }
    }
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            generation: 42,
            writer_id: [9; 16],
            module_sha256: [7; 32],
            input_offset: 123_456,
            output_marker: 7_890,
            input_position: b"opaque input position".to_vec(),
            output_position: vec![0, 1, 2, 255],
            random_seed: 5,
            random_position: 64,
            created_unix_ms: 1_700_000_000_000,
            run_state: RunState::ProgramExited(-3),
            packs: vec![
                PackRef {
                    generation: 41,
                    writer_id: [9; 16],
                    frames: 10,
                    bytes: 5000,
                },
                PackRef {
                    generation: 42,
                    writer_id: [8; 16],
                    frames: 3,
                    bytes: 700,
                },
            ],
            globals: vec![
                GlobalValue::I32(-5),
                GlobalValue::I64(1 << 40),
                GlobalValue::F32(1.5f32.to_bits()),
                GlobalValue::F64(2.5f64.to_bits()),
                GlobalValue::V128(u128::MAX - 1),
            ],
            memories: vec![
                MemoryManifest {
                    byte_len: 16 << 16,
                    digest: 0xdead_beef,
                    layers: vec![
                        vec![
                            Run {
                                first_page: 0,
                                pages: 4,
                                pack: 0,
                                first_frame: 2,
                            },
                            Run {
                                first_page: 9,
                                pages: 1,
                                pack: 1,
                                first_frame: 0,
                            },
                        ],
                        vec![Run {
                            first_page: 1,
                            pages: 2,
                            pack: 1,
                            first_frame: 1,
                        }],
                    ],
                },
                MemoryManifest {
                    byte_len: 0,
                    digest: 1,
                    layers: vec![],
                },
            ],
            host_state: vec![],
            kv_runs: vec![],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "m").unwrap(), m);
    }

    #[test]
    fn a_component_manifest_is_version_4_and_keeps_its_host_state() {
        let mut m = sample();
        let v3 = m.encode().unwrap();
        assert_eq!(u16::from_le_bytes([v3[8], v3[9]]), MANIFEST_VERSION);
        m.host_state = b"\x01kv and handles".to_vec();
        m.kv_runs = vec![KvRun {
            pack: 1,
            first_frame: 1,
            frames: 2,
            bytes: 70_000,
        }];
        let v4 = m.encode().unwrap();
        assert_eq!(u16::from_le_bytes([v4[8], v4[9]]), MANIFEST_VERSION_4);
        assert_eq!(Manifest::decode(&v4, "m").unwrap(), m);

        // Too many runs, or too many bytes in all.
        let run = m.kv_runs[0];
        for runs in [
            vec![run; MAX_KV_RUNS + 1],
            vec![
                KvRun {
                    bytes: MAX_KV_CHAIN_BYTES,
                    frames: u32::try_from(MAX_KV_CHAIN_BYTES.div_ceil(65536)).unwrap(),
                    first_frame: 0,
                    pack: 0,
                };
                1
            ],
        ] {
            let mut bad = m.clone();
            bad.packs[0].frames = u32::MAX;
            bad.packs[0].bytes = 1;
            bad.kv_runs = runs.clone();
            let mut bigger = bad.clone();
            bigger.kv_runs.push(run);
            let err = Manifest::decode(&bigger.encode().unwrap(), "m").unwrap_err();
            assert!(format!("{err:#}").contains("kv"), "{err:#}");
        }

        // A run that does not fit its pack, or whose frames do not match its size.
        for run in [
            KvRun {
                first_frame: 2,
                ..m.kv_runs[0]
            },
            KvRun {
                frames: 1,
                ..m.kv_runs[0]
            },
            KvRun {
                bytes: 0,
                frames: 0,
                ..m.kv_runs[0]
            },
            KvRun {
                pack: 9,
                ..m.kv_runs[0]
            },
        ] {
            let mut bad = m.clone();
            bad.kv_runs = vec![run];
            let err = Manifest::decode(&bad.encode().unwrap(), "m").unwrap_err();
            assert!(format!("{err:#}").contains("kv run 0"), "{err:#}");
        }
    }

    #[test]
    fn a_version_2_manifest_reads_with_its_byte_counts_as_positions() {
        let manifest = sample();
        let v2 = manifest.encode_as(MANIFEST_VERSION_2).unwrap();
        assert_eq!(u16::from_le_bytes([v2[8], v2[9]]), 2);
        let read = Manifest::decode(&v2, "v2").unwrap();
        assert_eq!(read.input_position, varint_bytes(manifest.input_offset));
        assert_eq!(read.output_position, varint_bytes(manifest.output_marker));
        let expected = Manifest {
            input_position: read.input_position.clone(),
            output_position: read.output_position.clone(),
            ..manifest
        };
        assert_eq!(read, expected);
    }

    #[test]
    fn a_newer_manifest_version_is_refused_by_name() {
        let mut bytes = sample().encode().unwrap();
        bytes[8] = 9;
        let err = Manifest::decode(&bytes, "m").unwrap_err();
        assert!(format!("{err:#}").contains("format version 9"), "{err:#}");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                assert!(
                    Manifest::decode(&bad, "m").is_err(),
                    "flip of bit {bit:#x} at byte {i} went undetected"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..len], "m").is_err(),
                "truncation to {len} bytes went undetected"
            );
        }
    }

    /// `body`, uncompressed (no flags), behind a header of `version` and with a valid CRC.
    fn framed_plain_body(version: u16, body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MANIFEST_MAGIC);
        bytes.put_u16(version);
        bytes.put_u16(0);
        bytes.put_u32(body.len() as u32);
        bytes.put_u32(body.len() as u32);
        bytes.extend_from_slice(body);
        let crc = crc32fast::hash(&bytes);
        bytes.put_u32(crc);
        bytes
    }

    /// Bodies the fuzzer (`fuzz/`, target `manifest_body`) and a reading of the decoder
    /// found to overflow: a memory of u64::MAX bytes summed, page numbers past 32 bits cut
    /// short. Each must decode to an error, or to a manifest that survives every use.
    #[test]
    fn bodies_that_once_overflowed_are_refused_or_harmless() {
        let bodies = [
            // memory_bytes summed byte lengths of 0, u64::MAX, 0 and 1
            "0909000000000d5ae107070700000000000500000000010100010000ffffffffffffffffffffffff000000000000000000400100000000000094010000000000000400000000010100010000ffffffffffffffffff010100010000000000000000400100000000000001010001000000000000",
            // covered_by added page numbers past u32
            "01000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000010000000000000000000000000000000001010004000001808080808080800200000000000000000201ffffffff0f02000001ffffffff0f020002",
            // encode subtracted a page number cut to 32 bits
            "0100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001000000000000000000000000000000000101000200000180808080808080020000000000000000010200010000ffffffff0f010001",
            // live_frames added runs of 2^31 + 1 pages in 32 bits
            "010000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000100000000000000000000000000000000010100818080800800000180808080808080020000000000000000010200818080800800000081808080080000",
        ];
        for hex in bodies {
            let body: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            for version in [MANIFEST_VERSION_2, MANIFEST_VERSION] {
                let bytes = framed_plain_body(version, &body);
                if let Ok(m) = Manifest::decode(&bytes, "m") {
                    m.memory_bytes();
                    m.live_frames();
                    let again = Manifest::decode(&m.encode().unwrap(), "m").unwrap();
                    assert_eq!(again, m);
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Manifest::decode(&bytes, "m");
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            // A body that passes the checksum but is garbage: only the body decoder stands guard.
            let _ = Manifest::decode(&framed_plain_body(MANIFEST_VERSION, &body), "m");
        }

        #[test]
        fn random_manifests_round_trip(
            generation in 0u64..=crate::store::MAX_GENERATION,
            runs in proptest::collection::vec((0u32..5, 1u32..9, 0u32..2), 0..50),
            globals in proptest::collection::vec(proptest::num::i64::ANY, 0..8),
        ) {
            let mut m = sample();
            m.generation = generation;
            m.globals = globals.into_iter().map(GlobalValue::I64).collect();
            m.packs[0].frames = 1000;
            let mut page = 0;
            let mut layer = Vec::new();
            for (gap, pages, pack) in runs {
                let first_frame = if pack == 0 { page } else { 0 };
                let pages = if pack == 0 { pages } else { 1 };
                layer.push(Run { first_page: page + gap, pages, pack, first_frame });
                page += gap + pages;
            }
            // Every pack a manifest lists is used by some page.
            layer.push(Run { first_page: page, pages: 1, pack: 0, first_frame: page });
            layer.push(Run { first_page: page + 1, pages: 1, pack: 1, first_frame: 0 });
            page += 2;
            m.memories[0].byte_len = u64::from(page + 1) << 16;
            m.memories[0].layers = vec![layer.clone(), layer];
            proptest::prop_assert_eq!(Manifest::decode(&m.encode().unwrap(), "m").unwrap(), m);
        }
    }

    #[test]
    fn a_delta_without_a_page_below_it_or_a_run_past_its_pack_is_refused() {
        let mut m = sample();
        m.memories[0].layers[1][0].first_page = 5; // page 5 has no whole-page frame
        let err = Manifest::decode(&m.encode().unwrap(), "m").unwrap_err();
        assert!(err.to_string().contains("without layer 0"), "{err}");
        let mut m = sample();
        m.memories[0].layers[0][1].first_frame = 3; // pack 1 has frames 0..3
        assert!(Manifest::decode(&m.encode().unwrap(), "m").is_err());
        let mut m = sample();
        m.memories[0].layers[0][1].first_page = 16; // memory has 16 pages
        assert!(Manifest::decode(&m.encode().unwrap(), "m").is_err());
    }

    #[test]
    fn a_tiny_guest_costs_a_few_hundred_bytes() {
        let mut m = sample();
        m.memories.truncate(1);
        let len = m.encode().unwrap().len();
        assert!(len < 300, "manifest is {len} bytes");
    }

    #[test]
    fn writers_produce_different_bytes_for_the_same_state() {
        let a = sample();
        let mut b = sample();
        b.writer_id = [10; 16];
        assert_ne!(a.encode().unwrap(), b.encode().unwrap());
    }
}
