//! The record driver: one `process` call per input record, a checkpoint after every
//! `checkpoint_every` records and one at the end of the input.

use anyhow::Result;

use super::checkpoints::{Checkpoints, InputAt};
use super::observer::CheckpointObserver;
use super::{Driver, Worked};
use crate::guest::GuestInstance;
use crate::store::manifest::RunState;
use crate::stream::Source;

pub(super) struct Records {
    pub source: Box<dyn Source>,
    pub checkpoint_every: u64,
    pub since_checkpoint: u64,
}

impl Driver for Records {
    fn run(
        &mut self,
        checkpoints: &mut Checkpoints,
        observer: &mut dyn CheckpointObserver,
        worked: &mut Worked,
    ) -> Result<()> {
        let mut record = Vec::new();
        loop {
            let offset_before = self.source.offset();
            if !self.source.next_record(&mut record)? {
                break;
            }
            let instance = &mut checkpoints.instance;
            instance.process(&record).map_err(|err| {
                err.context(format!("record at input byte offset {offset_before}"))
            })?;
            instance.take_emitted(checkpoints.sink.buffer());
            checkpoints.sink.maybe_write()?;
            worked.records += 1;
            self.since_checkpoint += 1;
            if self.since_checkpoint >= self.checkpoint_every {
                self.checkpoint(checkpoints, observer)?;
                worked.checkpoints += 1;
            }
        }
        if self.since_checkpoint > 0 || checkpoints.captured_generation == 0 {
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
        Ok(())
    }
}
