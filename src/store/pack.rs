//! Pack objects: the pages one checkpoint wrote, each compressed on its own and framed
//! with a CRC-32, so a restore can fetch one pack and decode any page of it independently.
//! The byte layout is specified in `docs/FORMAT.md`.

use anyhow::{Context, Result, bail};

use super::codec::{Put, Reader};

pub const PACK_MAGIC: &[u8; 8] = b"WASNAPPK";
pub const PACK_VERSION: u16 = 1;
/// magic, version, flags, reserved, generation, writer id.
pub const PACK_HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8 + 16;
/// payload length, CRC-32 of the payload.
pub const FRAME_HEADER_LEN: usize = 4 + 4;

/// zstd level for pages: 64 KiB pages compress fast at low levels, and the stall matters
/// more than the last few percent of size.
pub const ZSTD_LEVEL: i32 = 1;

/// How a page's bytes are encoded in its frame. Written into the manifest beside each
/// page, so later encodings (deltas against an older version) can be added without
/// breaking stores written today.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The whole page, one zstd frame.
    Zstd = 1,
}

impl Encoding {
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            1 => Ok(Encoding::Zstd),
            other => bail!("unknown page encoding {other} (written by a newer wasnap?)"),
        }
    }
}

/// Where one page's frame sits in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef {
    pub offset: u64,
    /// Whole frame, header included.
    pub len: u32,
}

/// Build a pack holding `pages` (in order), compressing on all cores.
/// Returns the pack bytes and where each page's frame is.
pub fn encode_pack(
    generation: u64,
    writer_id: &[u8; 16],
    pages: &[&[u8]],
) -> Result<(Vec<u8>, Vec<FrameRef>)> {
    let payloads = compress_parallel(pages)?;
    let total: usize = payloads.iter().map(|p| p.len() + FRAME_HEADER_LEN).sum();
    let mut pack = Vec::with_capacity(PACK_HEADER_LEN + total);
    pack.extend_from_slice(PACK_MAGIC);
    pack.put_u16(PACK_VERSION);
    pack.put_u16(0); // flags
    pack.put_u32(0); // reserved
    pack.put_u64(generation);
    pack.extend_from_slice(writer_id);
    let mut frames = Vec::with_capacity(payloads.len());
    for payload in &payloads {
        let len =
            u32::try_from(payload.len() + FRAME_HEADER_LEN).context("compressed page too large")?;
        frames.push(FrameRef {
            offset: pack.len() as u64,
            len,
        });
        pack.put_u32(payload.len() as u32);
        pack.put_u32(crc32fast::hash(payload));
        pack.extend_from_slice(payload);
    }
    Ok((pack, frames))
}

/// 64 KiB is below zstd's own multithreading job size, so parallelise across pages (but
/// compress a handful on the calling thread: starting threads would cost more).
fn compress_parallel(pages: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = pages.len().div_ceil(threads).max(16);
    if pages.len() <= per_thread {
        let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
        return pages
            .iter()
            .map(|page| Ok(compressor.compress(page)?))
            .collect();
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = pages
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || -> Result<Vec<Vec<u8>>> {
                    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
                    chunk
                        .iter()
                        .map(|page| Ok(compressor.compress(page)?))
                        .collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(pages.len());
        for worker in workers {
            out.extend(worker.join().expect("compression thread panicked")?);
        }
        Ok(out)
    })
}

/// Check a pack's header; `what` names the object in errors.
pub fn check_header(pack: &[u8], what: &str) -> Result<(u64, [u8; 16])> {
    let mut r = Reader::new(pack, what);
    if &r.array::<8>()? != PACK_MAGIC {
        bail!("{what} is not a wasnap pack (bad magic)");
    }
    let version = r.u16()?;
    if version != PACK_VERSION {
        bail!("{what} has pack format version {version}; this wasnap reads version {PACK_VERSION}");
    }
    let _flags = r.u16()?;
    let _reserved = r.u32()?;
    Ok((r.u64()?, r.array()?))
}

/// Decode the page whose frame is at `frame` in `pack` into `dst` (exactly the page's length).
pub fn decode_page(
    pack: &[u8],
    frame: FrameRef,
    encoding: Encoding,
    dst: &mut [u8],
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    what: &str,
) -> Result<()> {
    let start = usize::try_from(frame.offset).unwrap_or(usize::MAX);
    let bytes = start
        .checked_add(frame.len as usize)
        .and_then(|end| pack.get(start..end))
        .with_context(|| {
            format!(
                "{what}: frame at offset {} (len {}) lies outside the pack",
                frame.offset, frame.len
            )
        })?;
    let mut r = Reader::new(bytes, what);
    let payload_len = r.u32()? as usize;
    let crc = r.u32()?;
    if payload_len != r.remaining() {
        bail!(
            "{what} is corrupt: frame at offset {} has a bad length",
            frame.offset
        );
    }
    let payload = r.bytes(payload_len)?;
    if crc32fast::hash(payload) != crc {
        bail!(
            "{what} is corrupt: CRC mismatch in the frame at offset {}",
            frame.offset
        );
    }
    match encoding {
        Encoding::Zstd => {
            let n = decompressor
                .decompress_to_buffer(payload, dst)
                .with_context(|| {
                    format!(
                        "{what} is corrupt: frame at offset {} does not decompress",
                        frame.offset
                    )
                })?;
            if n != dst.len() {
                bail!(
                    "{what} is corrupt: frame at offset {} holds {n} bytes, expected {}",
                    frame.offset,
                    dst.len()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(pack: &[u8], frame: FrameRef, out: &mut [u8]) -> Result<()> {
        let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
        decode_page(pack, frame, Encoding::Zstd, out, &mut decompressor, "pack")
    }

    fn sample_pages() -> Vec<Vec<u8>> {
        (0..20u8)
            .map(|i| {
                (0..65536u32)
                    .map(|j| (j.wrapping_mul(i as u32 + 1) >> 5) as u8)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn pages_round_trip() {
        let pages = sample_pages();
        let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
        let (pack, frames) = encode_pack(7, &[3; 16], &refs).unwrap();
        assert_eq!(check_header(&pack, "pack").unwrap(), (7, [3; 16]));
        for (page, frame) in pages.iter().zip(&frames) {
            let mut out = vec![0; page.len()];
            decode(&pack, *frame, &mut out).unwrap();
            assert_eq!(&out, page);
        }
    }

    #[test]
    fn every_flipped_byte_of_a_frame_is_detected() {
        let page: Vec<u8> = (0..65536u32).map(|j| (j / 7) as u8).collect();
        let (pack, frames) = encode_pack(1, &[0; 16], &[&page]).unwrap();
        let frame = frames[0];
        let mut out = vec![0; page.len()];
        for i in frame.offset as usize..pack.len() {
            let mut bad = pack.clone();
            bad[i] ^= 0x01;
            assert!(
                decode(&bad, frame, &mut out).is_err(),
                "flip at byte {i} went undetected"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packs_and_frame_refs_never_panic(
            pack in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            offset in proptest::num::u64::ANY,
            len in proptest::num::u32::ANY,
        ) {
            let _ = check_header(&pack, "pack");
            let mut out = vec![0; 65536];
            let _ = decode(&pack, FrameRef { offset: offset % 256, len: len % 256 }, &mut out);
            let _ = decode(&pack, FrameRef { offset, len }, &mut out);
        }
    }

    #[test]
    fn a_bad_header_or_a_frame_outside_the_pack_is_an_error_not_a_panic() {
        let (mut pack, frames) = encode_pack(1, &[0; 16], &[&[1u8; 65536]]).unwrap();
        let mut out = vec![0; 65536];
        let outside = FrameRef {
            offset: u64::MAX - 3,
            len: frames[0].len,
        };
        assert!(decode(&pack, outside, &mut out).is_err());
        assert!(decode(&pack[..20], frames[0], &mut out).is_err());
        pack[0] = b'X';
        assert!(
            check_header(&pack, "pack")
                .unwrap_err()
                .to_string()
                .contains("not a wasnap pack")
        );
        assert!(check_header(&pack[..5], "pack").is_err());
    }
}
