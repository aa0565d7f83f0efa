//! Several outputs as one sink: a component's emit targets 0, 1, … each with its own
//! output (`--output` repeated, in order), and the dead letters last (`--on-trap skip`).
//! One checkpoint commits all of them: every output is made durable before the manifest,
//! published after it, and the manifest's marker holds each output's own marker, so a
//! restore cuts every output back to the same checkpoint (docs/FORMAT.md, "Version 3").
//!
//! A task may gain or drop its dead letters between runs (they start empty, or are no
//! longer written); its emit targets must stay the same.

use anyhow::Result;

use super::sink::{OutputCommit, OutputFlush, Sink};
use crate::codec::{Put, Reader};
use crate::error::changed;

/// The first bytes of a marker of several outputs.
const MULTI_MARKER_MAGIC: &[u8; 8] = b"WASNAPMO";

/// The most outputs one task may have.
pub const MAX_OUTPUTS: usize = 64;

pub struct MultiSink {
    outputs: Vec<Box<dyn Sink>>,
    /// Whether the last output holds the dead letters rather than an emit target.
    dead_letters: bool,
}

impl MultiSink {
    /// The outputs of targets 0, 1, …, in order, then the dead letters' if
    /// `dead_letters` (at least two outputs in all).
    pub fn new(outputs: Vec<Box<dyn Sink>>, dead_letters: bool) -> Self {
        debug_assert!(outputs.len() >= 2 && outputs.len() <= MAX_OUTPUTS);
        MultiSink {
            outputs,
            dead_letters,
        }
    }

    fn targets(&self) -> usize {
        self.outputs.len() - usize::from(self.dead_letters)
    }
}

/// A checkpoint's output marker, read: one marker per output, and whether the last is
/// the dead letters'. A single output's marker is one target's.
#[derive(Debug, PartialEq, Eq)]
pub struct Markers {
    pub markers: Vec<Vec<u8>>,
    pub dead_letters: bool,
}

impl Markers {
    pub fn read(marker: &[u8]) -> Result<Self> {
        Ok(decode_markers(marker)?.unwrap_or_else(|| Markers {
            markers: vec![marker.to_vec()],
            dead_letters: false,
        }))
    }

    /// How many emit targets wrote outputs.
    pub fn targets(&self) -> usize {
        self.markers.len() - usize::from(self.dead_letters)
    }

    /// The marker for a run with one output and no dead letters.
    pub fn single(mut self) -> Result<Vec<u8>> {
        if self.targets() != 1 {
            return Err(changed!(
                "the checkpoint wrote {} outputs and this run gives 1: run the task with the same --output list",
                self.targets()
            ));
        }
        Ok(self.markers.swap_remove(0))
    }
}

/// The id output `index` of task `task` goes by: the task's own for output 0 (so its
/// first output is the one a single-output run of the task would write), a derived one
/// for the others (a Kafka output's transactions are named by it, and two outputs must
/// not fence each other).
pub fn output_task_id(task: &[u8; 16], index: usize) -> [u8; 16] {
    let mut id = *task;
    if index > 0 {
        let mut seed = task.to_vec();
        seed.put_varint(index as u64);
        let mix = twox_hash::XxHash3_64::oneshot(&seed).to_le_bytes();
        id[..8].iter_mut().zip(mix).for_each(|(b, m)| *b ^= m);
    }
    id
}

/// A marker holding one marker per output; `dead_letters`: the last is the dead letters'.
pub fn encode_markers(markers: &[Vec<u8>], dead_letters: bool) -> Vec<u8> {
    let mut out = MULTI_MARKER_MAGIC.to_vec();
    out.put_varint(markers.len() as u64);
    out.put_u8(u8::from(dead_letters));
    for marker in markers {
        out.put_varint(marker.len() as u64);
        out.extend_from_slice(marker);
    }
    out
}

/// The markers of each output in `marker`, or `None` if it is a single output's.
pub fn decode_markers(marker: &[u8]) -> Result<Option<Markers>> {
    let Some(body) = marker.strip_prefix(MULTI_MARKER_MAGIC) else {
        return Ok(None);
    };
    let mut r = Reader::new(body, "the checkpoint's output markers");
    let count = r.varint_count(1)?;
    let flags = r.u8()?;
    if !(2..=MAX_OUTPUTS).contains(&count) || flags > 1 {
        return Err(crate::error::corrupt!(
            "the checkpoint's output markers are corrupt: {count} outputs, flags {flags}"
        ));
    }
    let markers = (0..count)
        .map(|_| {
            let n = r.varint_count(1)?;
            Ok(r.bytes(n)?.to_vec())
        })
        .collect::<Result<Vec<_>>>()?;
    r.finish()?;
    Ok(Some(Markers {
        markers,
        dead_letters: flags == 1,
    }))
}

impl Sink for MultiSink {
    fn resume_at(&mut self, task: &[u8; 16], marker: Option<&[u8]>) -> crate::Result<()> {
        let markers: Vec<Option<Vec<u8>>> = match marker {
            None => vec![None; self.outputs.len()],
            Some(marker) => {
                let theirs = Markers::read(marker)?;
                if theirs.targets() != self.targets() {
                    return Err(changed!(
                        "the checkpoint wrote {} outputs and this run gives {}: run the task with the same --output list",
                        theirs.targets(),
                        self.targets()
                    ).into());
                }
                let dead_letters = match theirs.dead_letters {
                    true => theirs.markers.last().cloned(),
                    false => None, // dead letters new to this run start empty
                };
                let mut markers: Vec<Option<Vec<u8>>> = theirs
                    .markers
                    .into_iter()
                    .take(self.targets())
                    .map(Some)
                    .collect();
                if self.dead_letters {
                    markers.push(dead_letters);
                }
                markers
            }
        };
        for (index, (output, marker)) in self.outputs.iter_mut().zip(markers).enumerate() {
            output.resume_at(&output_task_id(task, index), marker.as_deref())?;
        }
        Ok(())
    }

    fn buffer(&mut self) -> &mut Vec<u8> {
        self.outputs[0].buffer()
    }

    fn target_buffer(&mut self, target: usize) -> Option<&mut Vec<u8>> {
        self.outputs.get_mut(target).map(|output| output.buffer())
    }

    fn output_count(&self) -> usize {
        self.outputs.len()
    }

    fn buffered_len(&mut self) -> usize {
        self.outputs.iter_mut().map(|o| o.buffered_len()).sum()
    }

    fn maybe_write(&mut self) -> crate::Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.maybe_write())
    }

    fn checkpoint(&mut self, generation: u64, writer_id: &[u8; 16]) -> crate::Result<OutputFlush> {
        let flushes = self
            .outputs
            .iter_mut()
            .map(|o| o.checkpoint(generation, writer_id))
            .collect::<crate::Result<Vec<_>>>()?;
        let markers: Vec<Vec<u8>> = flushes.iter().map(|f| f.marker.clone()).collect();
        Ok(OutputFlush {
            marker: encode_markers(&markers, self.dead_letters),
            bytes: flushes.iter().map(|f| f.bytes).sum(),
            commit: Box::new(AllOutputs(flushes.into_iter().map(|f| f.commit).collect())),
        })
    }

    fn len(&self) -> u64 {
        self.outputs.iter().map(|o| o.len()).sum()
    }

    fn needs_commit(&self) -> bool {
        self.outputs.iter().any(|o| o.needs_commit())
    }
}

/// Every output's commit, in output order.
struct AllOutputs(Vec<Box<dyn OutputCommit>>);

impl OutputCommit for AllOutputs {
    fn make_durable(&mut self) -> crate::Result<()> {
        self.0.iter_mut().try_for_each(|c| c.make_durable())
    }

    fn publish(&mut self) -> crate::Result<()> {
        self.0.iter_mut().try_for_each(|c| c.publish())
    }

    fn held_bytes(&self) -> u64 {
        self.0.iter().map(|c| c.held_bytes()).sum()
    }

    fn done_by_the_next(&self) -> bool {
        self.0.iter().all(|c| c.done_by_the_next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_a_single_marker_is_told_apart() {
        let markers = vec![vec![1, 2], vec![], vec![0xff; 300]];
        let encoded = encode_markers(&markers, true);
        let read = Markers::read(&encoded).unwrap();
        assert_eq!((read.targets(), read.dead_letters), (2, true));
        assert_eq!(read.markers, markers);
        assert_eq!(decode_markers(&[0x80, 0x01]).unwrap(), None);
        assert_eq!(
            Markers::read(&[0x80, 0x01]).unwrap().single().unwrap(),
            [0x80, 0x01]
        );
        // One target and its dead letters: a run without dead letters takes the target's.
        let with_dead = encode_markers(&[vec![7], vec![8]], true);
        assert_eq!(Markers::read(&with_dead).unwrap().single().unwrap(), [7]);
        assert!(
            Markers::read(&encode_markers(&[vec![7], vec![8]], false))
                .unwrap()
                .single()
                .is_err()
        );
        for bad in [
            encode_markers(&[vec![1], vec![2]], false)[..12].to_vec(),
            encode_markers(&[vec![1]], false),
            encode_markers(&[], false),
        ] {
            assert!(decode_markers(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_output_has_its_own_task_id_and_the_first_keeps_the_tasks() {
        let task = [7; 16];
        assert_eq!(output_task_id(&task, 0), task);
        assert_ne!(output_task_id(&task, 1), task);
        assert_ne!(output_task_id(&task, 1), output_task_id(&task, 2));
    }
}
