//! A deterministic, checkpointed source for WASI `random_get`.
//!
//! Exactly-once means a restored guest must see the same bytes it would have seen had it
//! never stopped. Host entropy cannot be replayed, so wasnap hands guests a seeded stream
//! instead: byte `n` of the stream is a pure function of `(seed, n)`, and the stream's
//! position is written into every manifest and restored with the guest. A Rust guest's
//! `HashMap` seeds, for instance, then come out the same on every run.
//!
//! This is *not* a cryptographic generator: a guest that needs secrets must not rely on it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use twox_hash::XxHash3_128;

/// The default seed, so that two runs of the same task see the same stream.
pub const DEFAULT_SEED: u64 = 0x7761_736e_6170_0001;

#[derive(Debug)]
struct Stream {
    seed: u64,
    position: u64,
}

impl Stream {
    /// The 16-byte block that holds stream bytes `16 * block .. 16 * block + 16`.
    fn block(&self, block: u64) -> [u8; 16] {
        XxHash3_128::oneshot_with_seed(self.seed, &block.to_le_bytes()).to_le_bytes()
    }

    fn fill(&mut self, dst: &mut [u8]) {
        let mut written = 0;
        while written < dst.len() {
            let block = self.block(self.position / 16);
            let start = (self.position % 16) as usize;
            let n = (16 - start).min(dst.len() - written);
            dst[written..written + n].copy_from_slice(&block[start..start + n]);
            written += n;
            self.position += n as u64;
        }
    }
}

/// A handle on the shared stream; one is given to WASI, one is kept by the engine to
/// read and set the position at checkpoints.
#[derive(Clone, Debug)]
pub struct DeterministicRandom(Arc<Mutex<Stream>>);

impl DeterministicRandom {
    pub fn new(seed: u64, position: u64) -> Self {
        Self(Arc::new(Mutex::new(Stream { seed, position })))
    }

    /// How many bytes the guest has drawn so far.
    pub fn position(&self) -> u64 {
        self.lock().position
    }

    /// Move the stream to `position` (a restore, after the start function drew from it).
    pub fn set_position(&self, position: u64) {
        self.lock().position = position;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stream> {
        // The stream holds two integers; a panic elsewhere cannot leave them inconsistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl rand_core::TryRng for DeterministicRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0; 4];
        self.lock().fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0; 8];
        self.lock().fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.lock().fill(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::Rng;

    #[test]
    fn resuming_at_a_position_continues_the_same_stream() {
        let mut whole = DeterministicRandom::new(7, 0);
        let mut all = [0u8; 100];
        whole.fill_bytes(&mut all);

        let mut first = DeterministicRandom::new(7, 0);
        let mut head = [0u8; 37];
        first.fill_bytes(&mut head);
        let mut resumed = DeterministicRandom::new(7, first.position());
        let mut tail = [0u8; 63];
        resumed.fill_bytes(&mut tail);

        assert_eq!(&all[..37], &head);
        assert_eq!(&all[37..], &tail);
        assert_eq!(resumed.position(), 100);
    }

    #[test]
    fn different_seeds_give_different_streams() {
        let (mut a, mut b) = (
            DeterministicRandom::new(1, 0),
            DeterministicRandom::new(2, 0),
        );
        assert_ne!(a.next_u64(), b.next_u64());
    }
}
