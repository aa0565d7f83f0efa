//! Errors a caller may want to tell apart (everything else is a plain `anyhow::Error`
//! with context naming the cause).

/// Another writer committed the generation this one tried to commit: it owns the task now.
#[derive(Debug, thiserror::Error)]
#[error(
    "another writer owns this task: checkpoint generation {generation} was already committed \
     by a different process; this writer is fenced and stops without committing"
)]
pub struct Fenced {
    pub generation: u64,
}

/// The guest is not the module the store's checkpoints were taken of.
#[derive(Debug, thiserror::Error)]
#[error(
    "the guest module changed since checkpoint {generation}: the store holds state of module \
     sha256 {expected}, but this guest is sha256 {actual}; refusing to restore it into a \
     different module (use a new store to start over)"
)]
pub struct ModuleChanged {
    pub generation: u64,
    pub expected: String,
    pub actual: String,
}

/// Another live process writes this task's output file.
#[derive(Debug, thiserror::Error)]
#[error(
    "another writer owns this task: output {} is locked by another live wasnap process",
    path.display()
)]
pub struct OutputLocked {
    pub path: std::path::PathBuf,
}

/// The store could not be reached, or failed a request: retrying later may work. Never a
/// reason to fall back to an older checkpoint (unlike a corrupt or missing object).
#[derive(Debug, thiserror::Error)]
#[error("store {store} is unavailable")]
pub struct StoreUnavailable {
    pub store: String,
}
