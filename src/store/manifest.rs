//! Manifests: one object per committed checkpoint that says everything a restore needs,
//! with no chain to walk: the whole page table, the globals, the memory sizes, the
//! module's SHA-256, and the stream positions (input offset, output flush marker) that
//! the commit binds to that state. The byte layout is specified in `docs/FORMAT.md`.

use anyhow::{Context, Result, bail};

use super::codec::{Put, Reader};
use super::pack::{Encoding, FrameRef};
use crate::guest::GlobalValue;

pub const MANIFEST_MAGIC: &[u8; 8] = b"WASNAPMF";
pub const MANIFEST_VERSION: u16 = 1;
/// magic, version, flags, stored body length, raw body length.
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 4;
const FLAG_BODY_ZSTD: u16 = 1;
/// A manifest body larger than this is refused rather than allocated.
const MAX_BODY_LEN: usize = 1 << 30;

/// One non-zero page of a memory and where its bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    /// Page index within its memory (64 KiB pages).
    pub page: u32,
    pub encoding: Encoding,
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    pub frame: FrameRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryManifest {
    pub byte_len: u64,
    /// XXH3-64 over the memory's page hashes (see `snapshot::pages::memory_digest`).
    pub digest: u64,
    /// Non-zero pages in ascending page order; a page not listed is all zero.
    pub pages: Vec<PageRef>,
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
    pub random_seed: u64,
    /// Bytes of the WASI random stream the guest had drawn.
    pub random_position: u64,
    pub created_unix_ms: u64,
    /// Pack object names (relative to `packs/`) that the page table refers to.
    pub packs: Vec<String>,
    pub globals: Vec<GlobalValue>,
    pub memories: Vec<MemoryManifest>,
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut body = Vec::with_capacity(
            256 + self
                .memories
                .iter()
                .map(|m| m.pages.len() * 21)
                .sum::<usize>(),
        );
        body.put_u64(self.generation);
        body.extend_from_slice(&self.writer_id);
        body.extend_from_slice(&self.module_sha256);
        body.put_u64(self.input_offset);
        body.put_u64(self.output_marker);
        body.put_u64(self.random_seed);
        body.put_u64(self.random_position);
        body.put_u64(self.created_unix_ms);
        body.put_u32(self.packs.len() as u32);
        for name in &self.packs {
            let len = u16::try_from(name.len()).context("pack name too long")?;
            body.put_u16(len);
            body.extend_from_slice(name.as_bytes());
        }
        body.put_u32(self.globals.len() as u32);
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
        body.put_u32(self.memories.len() as u32);
        for memory in &self.memories {
            body.put_u64(memory.byte_len);
            body.put_u64(memory.digest);
            body.put_u32(memory.pages.len() as u32);
            for p in &memory.pages {
                body.put_u32(p.page);
                body.put_u8(p.encoding as u8);
                body.put_u32(p.pack);
                body.put_u64(p.frame.offset);
                body.put_u32(p.frame.len);
            }
        }

        let stored = zstd::bulk::compress(&body, 3)?;
        let mut out = Vec::with_capacity(HEADER_LEN + stored.len() + 4);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.put_u16(MANIFEST_VERSION);
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
            bail!("{what} is not a wasnap manifest (bad magic)");
        }
        let version = r.u16()?;
        if version != MANIFEST_VERSION {
            bail!(
                "{what} has manifest format version {version}; this wasnap reads version {MANIFEST_VERSION}"
            );
        }
        let flags = r.u16()?;
        let stored_len = r.u32()? as usize;
        let raw_len = r.u32()? as usize;
        if stored_len != r.remaining().saturating_sub(4) {
            bail!("{what} is corrupt: its length field does not match its size");
        }
        let (covered, crc_bytes) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(covered) != u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes")) {
            bail!("{what} is corrupt: checksum mismatch");
        }
        if flags & !FLAG_BODY_ZSTD != 0 {
            bail!("{what} uses unknown flags {flags:#x} (written by a newer wasnap?)");
        }
        let stored = r.bytes(stored_len)?;
        let body = if flags & FLAG_BODY_ZSTD != 0 {
            if raw_len > MAX_BODY_LEN {
                bail!("{what} is corrupt: body length {raw_len} is implausible");
            }
            let body = zstd::bulk::decompress(stored, raw_len)
                .with_context(|| format!("{what} is corrupt: body does not decompress"))?;
            if body.len() != raw_len {
                bail!(
                    "{what} is corrupt: body is {} bytes, header says {raw_len}",
                    body.len()
                );
            }
            body
        } else {
            stored.to_vec()
        };
        Self::decode_body(&body, what)
    }

    fn decode_body(body: &[u8], what: &str) -> Result<Self> {
        let mut r = Reader::new(body, what);
        let generation = r.u64()?;
        let writer_id = r.array()?;
        let module_sha256 = r.array()?;
        let input_offset = r.u64()?;
        let output_marker = r.u64()?;
        let random_seed = r.u64()?;
        let random_position = r.u64()?;
        let created_unix_ms = r.u64()?;
        let packs = (0..r.count(2)?)
            .map(|_| {
                let len = r.u16()? as usize;
                String::from_utf8(r.bytes(len)?.to_vec())
                    .with_context(|| format!("{what}: pack name is not UTF-8"))
            })
            .collect::<Result<Vec<_>>>()?;
        let globals = (0..r.count(5)?)
            .map(|_| {
                Ok(match r.u8()? {
                    0 => GlobalValue::I32(r.u32()? as i32),
                    1 => GlobalValue::I64(r.u64()? as i64),
                    2 => GlobalValue::F32(r.u32()?),
                    3 => GlobalValue::F64(r.u64()?),
                    4 => GlobalValue::V128(u128::from_le_bytes(r.array()?)),
                    other => bail!("{what} is corrupt: unknown global type {other}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let memories = (0..r.count(20)?)
            .map(|index| {
                let byte_len = r.u64()?;
                let digest = r.u64()?;
                let mut pages = Vec::with_capacity(r.remaining().min(1 << 20) / 21);
                for _ in 0..r.count(21)? {
                    let page = PageRef {
                        page: r.u32()?,
                        encoding: Encoding::from_byte(r.u8()?).with_context(|| what.to_string())?,
                        pack: r.u32()?,
                        frame: FrameRef {
                            offset: r.u64()?,
                            len: r.u32()?,
                        },
                    };
                    if page.pack as usize >= packs.len() {
                        bail!(
                            "{what} is corrupt: memory {index} names pack #{} of {}",
                            page.pack,
                            packs.len()
                        );
                    }
                    if pages
                        .last()
                        .is_some_and(|last: &PageRef| last.page >= page.page)
                        || u64::from(page.page) * crate::snapshot::PAGE_SIZE as u64 >= byte_len
                    {
                        bail!(
                            "{what} is corrupt: memory {index} has a misplaced page {}",
                            page.page
                        );
                    }
                    pages.push(page);
                }
                Ok(MemoryManifest {
                    byte_len,
                    digest,
                    pages,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        r.finish()?;
        Ok(Self {
            generation,
            writer_id,
            module_sha256,
            input_offset,
            output_marker,
            random_seed,
            random_position,
            created_unix_ms,
            packs,
            globals,
            memories,
        })
    }

    /// Bytes of memory, all memories together.
    pub fn memory_bytes(&self) -> u64 {
        self.memories.iter().map(|m| m.byte_len).sum()
    }

    /// Non-zero pages in the table, all memories together.
    pub fn stored_pages(&self) -> usize {
        self.memories.iter().map(|m| m.pages.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            generation: 42,
            writer_id: [9; 16],
            module_sha256: [7; 32],
            input_offset: 123_456,
            output_marker: 7_890,
            random_seed: 5,
            random_position: 64,
            created_unix_ms: 1_700_000_000_000,
            packs: vec![
                "00000000000000000041-ab.pack".into(),
                "00000000000000000042-cd.pack".into(),
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
                    byte_len: 4 << 16,
                    digest: 0xdead_beef,
                    pages: vec![
                        PageRef {
                            page: 0,
                            encoding: Encoding::Zstd,
                            pack: 0,
                            frame: FrameRef {
                                offset: 40,
                                len: 100,
                            },
                        },
                        PageRef {
                            page: 3,
                            encoding: Encoding::Zstd,
                            pack: 1,
                            frame: FrameRef { offset: 40, len: 9 },
                        },
                    ],
                },
                MemoryManifest {
                    byte_len: 0,
                    digest: 1,
                    pages: vec![],
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "m").unwrap(), m);
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

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Manifest::decode(&bytes, "m");
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            // A body that passes the checksum but is garbage: only the body decoder stands guard.
            let mut bytes = Vec::new();
            bytes.extend_from_slice(MANIFEST_MAGIC);
            bytes.put_u16(MANIFEST_VERSION);
            bytes.put_u16(0);
            bytes.put_u32(body.len() as u32);
            bytes.put_u32(body.len() as u32);
            bytes.extend_from_slice(&body);
            let crc = crc32fast::hash(&bytes);
            bytes.put_u32(crc);
            let _ = Manifest::decode(&bytes, "m");
        }

        #[test]
        fn random_manifests_round_trip(
            generation in 0u64..u64::MAX,
            offsets in proptest::collection::vec((0u64..1 << 40, 1u32..70_000), 0..50),
            globals in proptest::collection::vec(proptest::num::i64::ANY, 0..8),
        ) {
            let mut m = sample();
            m.generation = generation;
            m.globals = globals.into_iter().map(GlobalValue::I64).collect();
            m.memories[0].byte_len = (offsets.len() as u64 + 1) << 16;
            m.memories[0].pages = offsets
                .iter()
                .enumerate()
                .map(|(i, (offset, len))| PageRef {
                    page: i as u32,
                    encoding: Encoding::Zstd,
                    pack: (i % 2) as u32,
                    frame: FrameRef { offset: *offset, len: *len },
                })
                .collect();
            proptest::prop_assert_eq!(Manifest::decode(&m.encode().unwrap(), "m").unwrap(), m);
        }
    }

    #[test]
    fn writers_produce_different_bytes_for_the_same_state() {
        let a = sample();
        let mut b = sample();
        b.writer_id = [10; 16];
        assert_ne!(a.encode().unwrap(), b.encode().unwrap());
    }
}
