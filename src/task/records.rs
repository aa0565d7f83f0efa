//! The record driver: one `process` call per input record, a checkpoint after every
//! `checkpoint_every` records (or, with an interval, once that much time has passed since
//! the last, records having come), and one at the end of the input or when told to stop.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::checkpoints::{Checkpoints, InputAt};
use super::observer::CheckpointObserver;
use super::{Driver, Worked};
use crate::guest::GuestInstance;
use crate::store::manifest::RunState;
use crate::stream::{Polled, Source};

/// How long one wait for a record lasts on an input that may idle: how soon a stop or a
/// checkpoint that fell due is noticed.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A checkpoint is taken early once this much output waits in the sink.
pub(crate) const MAX_BUFFERED_OUTPUT: usize = 64 << 20;

pub(super) struct Records {
    pub source: Box<dyn Source>,
    /// `--on-trap skip`: records the guest failed on, by input offset, with the error,
    /// and the output (a target of the sink) their dead letters go to.
    pub poison: Option<Poison>,
    pub checkpoint_every: u64,
    /// Also checkpoint once the interval has passed since the last checkpoint, if records
    /// came.
    pub interval: IntervalClock,
    pub since_checkpoint: u64,
}

/// The clock reads are at most this far apart while records come.
const CLOCK_PERIOD: Duration = Duration::from_millis(1);

/// At most this many records between two clock reads: at 4 M records/s a read (about
/// 50 ns here) then costs 1.5 ns a record.
const MAX_CLOCK_STRIDE: u32 = 32;

/// Whether the checkpoint interval has passed, reading the clock about once a millisecond
/// rather than after every record: a read per record was 16 % of the counter guest's
/// speed at 4 M records/s. The records between two reads double while the reads come
/// under `CLOCK_PERIOD` apart and halve once they do not, so a steady stream overruns the
/// interval by a millisecond or two and a slow one is looked at after every record. Only
/// a stream that drops from a fast burst to a trickle overruns by more, until the stride
/// shrinks: at most `MAX_CLOCK_STRIDE` records (a stream quieter than `IDLE_WAIT` is
/// checked on every idle wait).
pub(super) struct IntervalClock {
    interval: Option<Duration>,
    last_checkpoint: Instant,
    last_read: Instant,
    stride: u32,
    until_read: u32,
}

impl IntervalClock {
    pub fn new(interval: Option<Duration>) -> Self {
        let now = Instant::now();
        Self {
            interval,
            last_checkpoint: now,
            last_read: now,
            stride: 1,
            until_read: 1,
        }
    }

    /// After a record: due, reading the clock only once the stride's records went by.
    fn due_after_record(&mut self) -> bool {
        if self.interval.is_none() {
            return false;
        }
        self.until_read -= 1;
        self.until_read == 0 && self.due_now()
    }

    /// Due, reading the clock now.
    fn due_now(&mut self) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        let now = Instant::now();
        self.stride = if now.duration_since(self.last_read) < CLOCK_PERIOD {
            (self.stride * 2).min(MAX_CLOCK_STRIDE)
        } else {
            (self.stride / 2).max(1)
        };
        self.until_read = self.stride;
        self.last_read = now;
        now.duration_since(self.last_checkpoint) >= interval
    }

    fn checkpointed(&mut self) {
        if self.interval.is_some() {
            self.last_checkpoint = Instant::now();
        }
    }
}

/// Records to pass by rather than process (`--on-trap skip`).
pub struct Poison {
    /// Input offset of each record the guest failed on, and its error.
    pub skip: std::collections::BTreeMap<u64, String>,
    /// The sink target the dead letters go to.
    pub dead_letters: usize,
}

impl Poison {
    /// One dead letter: a JSON line with the record's input offset, the guest's error and
    /// the record (as text if it is UTF-8, else as hex).
    fn letter(offset: u64, error: &str, record: &[u8]) -> Vec<u8> {
        let mut letter = serde_json::json!({ "offset": offset, "error": error });
        match std::str::from_utf8(record) {
            Ok(text) => letter["record"] = text.into(),
            Err(_) => letter["record_hex"] = crate::hex::encode(record).into(),
        }
        let mut line = letter.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

impl Driver for Records {
    fn run(
        &mut self,
        checkpoints: &mut Checkpoints,
        observer: &mut dyn CheckpointObserver,
        worked: &mut Worked,
    ) -> Result<()> {
        let mut record = Vec::new();
        while !checkpoints.stop.is_stopped() {
            let offset_before = self.source.offset();
            match self
                .source
                .poll_record(&mut record, IDLE_WAIT)
                .map_err(crate::Error::into_anyhow)?
            {
                Polled::Record => {}
                Polled::End => break,
                Polled::Idle => {
                    if self.since_checkpoint > 0 && self.interval.due_now() {
                        self.checkpoint(checkpoints, observer)?;
                        worked.checkpoints += 1;
                    }
                    // What the committer finished while the input was quiet.
                    checkpoints.settle_finished(observer)?;
                    continue;
                }
            }
            if let Some(poison) = &self.poison
                && let Some(error) = poison.skip.get(&offset_before)
            {
                let letter = Poison::letter(offset_before, error, &record);
                let Some(dead_letters) = checkpoints.sink.target_buffer(poison.dead_letters) else {
                    anyhow::bail!("the run has no dead-letter output");
                };
                dead_letters.extend_from_slice(&letter);
                tracing::warn!(
                    "skipped the record at input offset {offset_before} to the dead letters: {error}"
                );
            } else {
                let instance = &mut checkpoints.instance;
                if let Err(err) = instance.process(&record) {
                    // A trap or the memory limit happens again on the same state and record;
                    // a timeout need not, so skipping on one could not be repeated.
                    let repeatable = crate::error::kind_of(&err) == crate::ErrorKind::Guest
                        && !err.is::<crate::error::GuestTimedOut>();
                    if self.poison.is_some() && repeatable {
                        return Err(crate::error::PoisonRecord {
                            offset: offset_before,
                            message: format!("{err:#}"),
                            // Those after the last checkpoint are replayed after the skip.
                            records: worked.records.saturating_sub(self.since_checkpoint),
                            checkpoints: worked.checkpoints,
                        }
                        .into());
                    }
                    let at = self.source.locate(offset_before);
                    return Err(err.context(format!("the record at {at}")));
                }
            }
            let instance = &mut checkpoints.instance;
            instance.take_emitted(&mut *checkpoints.sink)?;
            checkpoints
                .sink
                .maybe_write()
                .map_err(crate::Error::into_anyhow)?;
            worked.records += 1;
            self.since_checkpoint += 1;
            // A sink that holds output until a checkpoint (object storage, Kafka; a file
            // while the committer is behind) is checkpointed early rather than let it
            // grow without bound.
            let output_waiting = checkpoints.sink.buffered_len() >= MAX_BUFFERED_OUTPUT;
            if self.since_checkpoint >= self.checkpoint_every
                || self.interval.due_after_record()
                || output_waiting
            {
                self.checkpoint(checkpoints, observer)?;
                worked.checkpoints += 1;
            }
        }
        // A last checkpoint for what came since the last one; for a fresh task that saw no
        // input (its first); and for a restored output that a crash left unpublished.
        if self.since_checkpoint > 0
            || checkpoints.captured_generation == 0
            || checkpoints.sink.needs_commit()
        {
            self.checkpoint(checkpoints, observer)?;
            worked.checkpoints += 1;
        }
        Ok(())
    }

    fn skip_poison(&mut self, poison: Poison) -> Result<()> {
        self.poison = Some(poison);
        Ok(())
    }

    fn input_at(&self, _instance: &GuestInstance) -> InputAt {
        InputAt {
            offset: self.source.offset(),
            position: self.source.position(),
            run_state: RunState::Records,
        }
    }
}

impl Records {
    fn checkpoint(
        &mut self,
        checkpoints: &mut Checkpoints,
        observer: &mut dyn CheckpointObserver,
    ) -> Result<()> {
        checkpoints.start(self.input_at(&checkpoints.instance), observer)?;
        self.since_checkpoint = 0;
        self.interval.checkpointed();
        Ok(())
    }
}
