//! A look at a rewritten page before its prefix delta: how much of it could its previous
//! version supply? A page whose bytes are new (a table refilled with fresh sessions, a
//! collector's new objects) gets little from the prefix, and the delta then loses to the
//! whole page after costing as much again to compress. Bytes that moved (a heap
//! compacted, a table rehashed) are found wherever they went.
//!
//! - Every 8-byte-aligned 8-byte window of the previous version sets a bit of a bitmap
//!   by its hash (256 Ki bits, about 3 % set: a sample's eight lookups hit by chance a
//!   fifth of the time, which is taken out at the end by the rate the bitmap's fill
//!   predicts).
//! - At 512 sample points of the page, the windows at the eight byte offsets after the
//!   point are looked up: a run of bytes moved by any distance is found, as one of eight
//!   consecutive windows lines up with an aligned window of the old copy.
//! - Windows of one repeated byte (runs of zeros) count for neither: a sample that
//!   starts with one is skipped, and one found at a shift is no hit, as the whole page
//!   codes them as cheaply as a prefix would.
//! - The share is of bytes, not of what they cost: it takes found and new bytes to
//!   compress alike, as a rewritten page's old and new objects mostly do. (Weighing each
//!   kind by its bytes' order-0 entropy was tried, and judged the AssemblyScript word
//!   count's pages worse: 1 105 pages whose delta won came out at 20–29 %, against 10
//!   by bytes, none of them under the threshold.)
//!
//! About 12 000 lookups, 26–34 µs a page (`page_delta/survey`): under a tenth of a
//! rewritten page's prefix delta.

/// log2 of the bitmap's bits: 256 Ki bits (32 KiB).
const TABLE_BITS: u32 = 18;
/// A sample point every this many bytes of the page: 512 on a 64 KiB page, for a share
/// within about 3 %.
const SAMPLE_STEP: usize = 128;
/// Bytes from a sample point to the end of its last window.
const SPAN: usize = 15;

/// The bitmap, kept by a [`super::Coder`] so that a survey allocates nothing.
pub struct Survey {
    seen: Vec<u64>,
}

impl Default for Survey {
    fn default() -> Self {
        Self {
            seen: vec![0; 1 << (TABLE_BITS - 6)],
        }
    }
}

fn window(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The window's bit in the bitmap.
fn slot(window: u64) -> usize {
    (window.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TABLE_BITS)) as usize
}

fn one_repeated_byte(window: u64) -> bool {
    window == (window & 0xff).wrapping_mul(0x0101_0101_0101_0101)
}

impl Survey {
    /// The share (in percent, 0–100) of `page`'s sampled bytes that `base` holds too,
    /// anywhere: what a prefix delta could leave out. 100 when there is nothing to sample
    /// (a page of runs, or shorter than a window and its shifts), so that the prefix delta
    /// is tried.
    pub fn found_percent(&mut self, page: &[u8], base: &[u8]) -> usize {
        if page.len() < SPAN || base.len() < 8 {
            return 100;
        }
        self.seen.fill(0);
        // Bits set, counted as they are (equal windows set one).
        let mut set = 0u32;
        for chunk in base.chunks_exact(8) {
            let s = slot(window(chunk));
            let (word, bit) = (&mut self.seen[s / 64], 1u64 << (s % 64));
            set += u32::from(*word & bit == 0);
            *word |= bit;
        }
        let (mut sampled, mut found) = (0u32, 0u32);
        for at in (0..=page.len() - SPAN).step_by(SAMPLE_STEP) {
            let span = &page[at..at + SPAN];
            if one_repeated_byte(window(span)) {
                continue;
            }
            sampled += 1;
            found += (0..8).fold(0, |hit, shift| {
                let window = window(&span[shift..]);
                let s = slot(window);
                let run = u64::from(one_repeated_byte(window));
                hit | (self.seen[s / 64] >> (s % 64)) & 1 & !run
            }) as u32;
        }
        if sampled == 0 {
            return 100;
        }
        // A new sample hits by chance with probability 1 - (1 - fill)^8.
        let fill = f64::from(set) / (1u64 << TABLE_BITS) as f64;
        let chance = 1.0 - (1.0 - fill).powi(8);
        if chance > 0.9 {
            // Only a base far longer than a page fills the bitmap so: nothing to judge by.
            return 100;
        }
        let observed = f64::from(found) / f64::from(sampled);
        let share = ((observed - chance) / (1.0 - chance)).clamp(0.0, 1.0);
        (share * 100.0).round() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::noise;

    const PAGE: usize = 65536;

    #[test]
    fn new_bytes_are_not_found_and_moved_ones_are_wherever_they_went() {
        let mut survey = Survey::default();
        let old = noise(1, PAGE);
        assert!(survey.found_percent(&noise(2, PAGE), &old) <= 8);
        for shift in 1..10 {
            let mut moved = noise(3, shift);
            moved.extend_from_slice(&old[..PAGE - shift]);
            let found = survey.found_percent(&moved, &old);
            assert!(found >= 97, "moved by {shift}: {found} % found");
        }
        // Half kept in place, half new, alike: about half.
        let mut half = old.clone();
        half[PAGE / 2..].copy_from_slice(&noise(4, PAGE / 2));
        let found = survey.found_percent(&half, &old);
        assert!((45..=55).contains(&found), "{found} % found");
    }

    #[test]
    fn runs_of_one_byte_count_for_neither() {
        let mut survey = Survey::default();
        let old = noise(9, PAGE);
        // New bytes among zeros: the zeros, which the whole page codes as cheaply, are
        // not counted as found in the old page's zeros.
        let mut page = vec![0u8; PAGE];
        page[..PAGE / 4].copy_from_slice(&noise(10, PAGE / 4));
        let mut zeros_too = old.clone();
        zeros_too[PAGE / 2..].fill(0);
        assert!(survey.found_percent(&page, &zeros_too) <= 8);
        // Nothing but runs: nothing to judge by.
        assert_eq!(survey.found_percent(&vec![7u8; PAGE], &old), 100);
        assert_eq!(survey.found_percent(&[1, 2, 3], &old), 100);
    }
}
