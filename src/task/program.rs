//! The stdio driver: an asyncified WASI command runs until it unwinds at a stdin read
//! (a checkpoint is due) or exits; each time a checkpoint is taken, and the program is
//! rewound where it stopped. Its exit status is the last checkpoint's run state, so a
//! restart of a finished program finds nothing left to do.

use anyhow::{Result, bail};

use super::checkpoints::{Checkpoints, InputAt};
use super::observer::CheckpointObserver;
use super::{Driver, Worked};
use crate::error::{ErrorKind, error};
use crate::guest::{GuestInstance, ProgramOutcome};
use crate::store::manifest::RunState;

/// Where the program is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Program {
    NotStarted,
    /// Unwound at a stdin read: rewind to go on.
    Suspended,
    Exited(i32),
}

impl Program {
    /// Where a checkpoint's run state left the program.
    pub fn at(run_state: &RunState) -> Self {
        match run_state {
            RunState::ProgramSuspended { .. } => Program::Suspended,
            RunState::ProgramExited(status) => Program::Exited(*status),
            RunState::ProgramStart | RunState::Records => Program::NotStarted,
        }
    }
}

impl Driver for Program {
    fn run(
        &mut self,
        checkpoints: &mut Checkpoints,
        observer: &mut dyn CheckpointObserver,
        worked: &mut Worked,
    ) -> Result<()> {
        loop {
            let rewind = match *self {
                // A finished program whose last output a crash left unpublished: one more
                // checkpoint of the same state publishes it.
                Program::Exited(0) if checkpoints.sink.needs_commit() => {
                    checkpoints.start(self.input_at(&checkpoints.instance), observer)?;
                    worked.checkpoints += 1;
                    return Ok(());
                }
                Program::Exited(0) => return Ok(()),
                Program::Exited(status) => {
                    bail!(error(
                        ErrorKind::Guest,
                        format!("the program exited with status {status}")
                    ))
                }
                Program::Suspended => true,
                Program::NotStarted => false,
            };
            let outcome = checkpoints.instance.run_program(rewind);
            // What the program wrote is output whatever happened next; it is committed
            // only by a checkpoint, which follows at once and hands it all on (to the
            // committer, which writes it off the guest's thread).
            checkpoints.instance.take_emitted(&mut *checkpoints.sink)?;
            *self = match outcome? {
                ProgramOutcome::Unwound => Program::Suspended,
                ProgramOutcome::Exited(status) => Program::Exited(status),
            };
            checkpoints.start(self.input_at(&checkpoints.instance), observer)?;
            worked.checkpoints += 1;
        }
    }

    fn input_at(&self, instance: &GuestInstance) -> InputAt {
        let run_state = match *self {
            Program::NotStarted => RunState::ProgramStart,
            Program::Suspended => RunState::ProgramSuspended {
                unwind_data: instance
                    .unwind_data()
                    .expect("a suspended program has unwound its stack"),
            },
            Program::Exited(status) => RunState::ProgramExited(status),
        };
        InputAt {
            offset: instance.stdin_offset(),
            position: instance.stdin_position(),
            run_state,
        }
    }
}
