//! The baseline wasnap is measured against: what Wasman (Go, wazero) writes per snapshot.
//!
//! Wasman hashes memory in 4 KiB blocks with FNV-64a, writes a full gzip snapshot every
//! 5th version and otherwise the changed blocks, gzipped. Memory only: no globals. This
//! module computes exactly those bytes for the same memory at the same checkpoints, so one
//! bench run shows both side by side. Nothing is put to the store: sizes and times only.

use std::io::Write;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;

pub const BLOCK_SIZE: usize = 4096;
/// A full snapshot every this many versions.
pub const FULL_EVERY: u64 = 5;

/// FNV-64a, as Wasman uses for change detection.
pub fn fnv64a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One baseline snapshot.
#[derive(Clone, Debug)]
pub struct BaselineSnapshot {
    pub full: bool,
    /// Bytes the baseline would write for this version.
    pub bytes: usize,
    /// Blocks that changed since the previous version (all blocks for a full snapshot):
    /// what the tests check the baseline's diff by.
    #[cfg_attr(not(test), allow(dead_code))]
    pub changed_blocks: usize,
    pub hash: Duration,
    pub encode: Duration,
}

#[derive(Default)]
pub struct WasmanBaseline {
    block_hashes: Vec<u64>,
    versions: u64,
}

impl WasmanBaseline {
    /// Snapshot `memory` as Wasman would.
    pub fn snapshot(&mut self, memory: &[u8]) -> BaselineSnapshot {
        let hashing = Instant::now();
        let hashes: Vec<u64> = memory.chunks(BLOCK_SIZE).map(fnv64a).collect();
        let hash = hashing.elapsed();

        let encoding = Instant::now();
        let full = self.versions.is_multiple_of(FULL_EVERY);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        let changed_blocks = if full {
            gz.write_all(memory).expect("writing to a Vec cannot fail");
            hashes.len()
        } else {
            let mut changed = 0;
            for (index, (hash, block)) in hashes.iter().zip(memory.chunks(BLOCK_SIZE)).enumerate() {
                if self.block_hashes.get(index) != Some(hash) {
                    gz.write_all(&(index as u32).to_le_bytes()).expect("Vec");
                    gz.write_all(block).expect("Vec");
                    changed += 1;
                }
            }
            changed
        };
        let bytes = gz.finish().expect("Vec").len();
        self.block_hashes = hashes;
        self.versions += 1;
        BaselineSnapshot {
            full,
            bytes,
            changed_blocks,
            hash,
            encode: encoding.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv64a_matches_the_reference_vectors() {
        assert_eq!(fnv64a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn full_every_fifth_version_and_changed_blocks_otherwise() {
        let mut memory = vec![0u8; 16 * BLOCK_SIZE];
        let mut baseline = WasmanBaseline::default();
        let first = baseline.snapshot(&memory);
        assert!(first.full);
        assert_eq!(first.changed_blocks, 16);
        memory[3 * BLOCK_SIZE] = 1;
        memory[9 * BLOCK_SIZE + 5] = 2;
        let second = baseline.snapshot(&memory);
        assert!(!second.full);
        assert_eq!(second.changed_blocks, 2);
        for _ in 0..3 {
            assert!(!baseline.snapshot(&memory).full);
        }
        assert!(baseline.snapshot(&memory).full);
    }
}
