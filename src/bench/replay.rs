//! The baseline's pass: the guest run again over the same input, plainly (no store, no
//! captures), its memory handed over at the input offsets where the measured run's
//! checkpoints were committed. The baseline's own hashing and compression thus never slow
//! the run whose speed `bench` reports.

use anyhow::{Result, bail};

use crate::guest::{Guest, random};
use crate::stream::open_source;

/// Run `guest` from a fresh start over `input`, and call `at_offset(i, memories)` once
/// the input has been consumed up to `offsets[i]` (ascending), with every memory of the
/// guest concatenated.
pub fn memories_at(
    guest: &Guest,
    input: &std::path::Path,
    offsets: &[u64],
    at_offset: &mut dyn FnMut(usize, &[u8]),
) -> Result<()> {
    let mut source = open_source(input).map_err(crate::Error::into_anyhow)?;
    source.resume_at(None).map_err(crate::Error::into_anyhow)?;
    let mut instance = guest.instantiate(random::DEFAULT_SEED, 0)?;
    instance.start_fresh()?;
    let mut next = 0;
    let mut record = Vec::new();
    let mut hand_over = |next: &mut usize, offset: u64, instance: &crate::guest::GuestInstance| {
        while offsets.get(*next).is_some_and(|o| *o <= offset) {
            let mut memories = Vec::new();
            for i in 0..instance.memory_count() {
                memories.extend_from_slice(instance.memory(i));
            }
            at_offset(*next, &memories);
            *next += 1;
        }
    };
    hand_over(&mut next, source.offset(), &instance);
    while next < offsets.len()
        && source
            .next_record(&mut record)
            .map_err(crate::Error::into_anyhow)?
    {
        instance.process(&record)?;
        instance.discard_emitted();
        hand_over(&mut next, source.offset(), &instance);
    }
    if next < offsets.len() {
        bail!(
            "the input ended at offset {} before the checkpoint at offset {}: it changed between the bench's passes",
            source.offset(),
            offsets[next]
        );
    }
    Ok(())
}
