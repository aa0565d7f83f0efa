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
    pub checkpoint_every: u64,
    /// Also checkpoint once this long has passed since the last checkpoint, if records came.
    pub checkpoint_interval: Option<Duration>,
    pub since_checkpoint: u64,
    pub last_checkpoint: Instant,
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
            match self.source.poll_record(&mut record, IDLE_WAIT)? {
                Polled::Record => {}
                Polled::End => break,
                Polled::Idle => {
                    if self.since_checkpoint > 0 && self.interval_passed() {
                        self.checkpoint(checkpoints, observer)?;
                        worked.checkpoints += 1;
                    }
                    // What the committer finished while the input was quiet.
                    checkpoints.settle_finished(observer)?;
                    continue;
                }
            }
            let instance = &mut checkpoints.instance;
            instance.process(&record).map_err(|err| {
                err.context(format!("record at input byte offset {offset_before}"))
            })?;
            instance.take_emitted(checkpoints.sink.buffer());
            checkpoints.sink.maybe_write()?;
            worked.records += 1;
            self.since_checkpoint += 1;
            // A sink that holds output until a checkpoint (object storage, Kafka) is
            // checkpointed early rather than let it grow without bound.
            let output_waiting = checkpoints.sink.buffer().len() >= MAX_BUFFERED_OUTPUT;
            if self.since_checkpoint >= self.checkpoint_every
                || self.interval_passed()
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
        if self.checkpoint_interval.is_some() {
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    fn interval_passed(&self) -> bool {
        self.checkpoint_interval
            .is_some_and(|interval| self.last_checkpoint.elapsed() >= interval)
    }
}
