//! `wasnap bench --stdio`: what stdio mode costs. The same program over the same input,
//! three ways: the original module under plain WASI (no transform, no checkpoints), the
//! asyncified module under wasnap with no checkpoint until the end, and wasnap with a
//! checkpoint every N input bytes. All three outputs must be identical.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

use crate::guest::asyncify;
use crate::store::CheckpointStore;
use crate::task::{Mode, RunConfig};

pub struct StdioBenchReport {
    pub original_bytes: usize,
    pub asyncified_bytes: usize,
    pub input_bytes: u64,
    pub input_lines: u64,
    /// The original module under plain WASI.
    pub plain: Duration,
    /// The asyncified module under wasnap with no checkpoint by input, timed to the start
    /// of its checkpoint at the exit.
    pub asyncified: Duration,
    /// The asyncified module under wasnap, a checkpoint every `every_bytes`.
    pub checkpointed: Duration,
    pub checkpoints: u64,
    pub every_bytes: u64,
}

/// Run the original program under plain WASI; returns its stdout and the run's time.
fn run_plain(program: &[u8], input: Vec<u8>) -> Result<(Vec<u8>, Duration)> {
    let engine = Engine::default();
    let module = Module::new(&engine, program).map_err(anyhow::Error::from)?;
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |ctx| ctx)?;
    let stdout = MemoryOutputPipe::new(usize::MAX);
    let wasi = WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(input))
        .stdout(stdout.clone())
        .build_p1();
    let mut store = Store::new(&engine, wasi);
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(anyhow::Error::from)?;
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
    let started = Instant::now();
    match start.call(&mut store, ()) {
        Ok(()) => {}
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) if exit.0 == 0 => {}
            _ => return Err(anyhow::Error::from(e).context("the plain run failed")),
        },
    }
    let elapsed = started.elapsed();
    drop(store);
    Ok((stdout.contents().to_vec(), elapsed))
}

/// Run it under wasnap with a checkpoint every `every_bytes`; returns output, time, checkpoints.
/// With `u64::MAX` (no checkpoint by input), the time is the program's, to the start of
/// its checkpoint at the exit, as `wasnap bench` times its pass with checkpoints off;
/// otherwise until the last commit.
fn run_wasnap(program: &Path, input: &Path, every_bytes: u64) -> Result<(Vec<u8>, Duration, u64)> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let output = scratch.path().join("output");
    let mut config = RunConfig::new(program, input, &output).with_mode(Mode::stdio(every_bytes));
    config.task.retain = usize::MAX;
    let store = CheckpointStore::open(&scratch.path().join("store").display().to_string())
        .map_err(crate::Error::into_anyhow)?;
    let mut task = config.open(store).map_err(crate::Error::into_anyhow)?;
    let mut exited = super::LastCheckpointStarted(None);
    let running = Instant::now();
    let summary = task.run(&mut exited).map_err(crate::Error::into_anyhow)?;
    drop(task);
    let elapsed = match (every_bytes, exited.0) {
        (u64::MAX, Some(exited)) => exited.duration_since(running),
        (u64::MAX, None) => bail!("the run with no checkpoint took none at the program's exit"),
        _ => summary.elapsed,
    };
    Ok((std::fs::read(&output)?, elapsed, summary.checkpoints))
}

pub fn bench_stdio(program: &Path, input: &Path, every_bytes: u64) -> Result<StdioBenchReport> {
    let original = std::fs::read(program)
        .with_context(|| format!("cannot read program {}", program.display()))?;
    let asyncified = asyncify::asyncify(&original)?;
    let input_bytes =
        std::fs::read(input).with_context(|| format!("cannot read input {}", input.display()))?;
    let input_lines = input_bytes.iter().filter(|b| **b == b'\n').count() as u64;

    let (plain_out, plain) = run_plain(&original, input_bytes.clone())?;
    let (asyncified_out, asyncified_time, _) = run_wasnap(program, input, u64::MAX)?;
    let (checkpointed_out, checkpointed, checkpoints) = run_wasnap(program, input, every_bytes)?;
    if plain_out != asyncified_out || plain_out != checkpointed_out {
        bail!("the three runs gave different output: the program is not deterministic");
    }
    Ok(StdioBenchReport {
        original_bytes: original.len(),
        asyncified_bytes: asyncified.len(),
        input_bytes: input_bytes.len() as u64,
        input_lines,
        plain,
        asyncified: asyncified_time,
        checkpointed,
        checkpoints,
        every_bytes,
    })
}

impl StdioBenchReport {
    pub fn summary(&self, program: &str) -> String {
        let rate = |d: Duration| self.input_lines as f64 / d.as_secs_f64().max(1e-9);
        let mut out = format!(
            "program {program}: {} input lines ({}), module {} -> {} asyncified ({:+.1} %)\n\n",
            self.input_lines,
            super::human_bytes(self.input_bytes as f64),
            super::human_bytes(self.original_bytes as f64),
            super::human_bytes(self.asyncified_bytes as f64),
            100.0 * (self.asyncified_bytes as f64 / self.original_bytes as f64 - 1.0),
        );
        out += &format!(
            "{:<44} {:>10} {:>14} {:>8}\n",
            "", "time", "lines/s", "vs plain"
        );
        for (what, time) in [
            ("plain WASI, original module", self.plain),
            ("wasnap, asyncified, no checkpoint", self.asyncified),
            (
                &*format!(
                    "wasnap, {} checkpoints (every {})",
                    self.checkpoints,
                    super::human_bytes(self.every_bytes as f64)
                ),
                self.checkpointed,
            ),
        ] {
            out += &format!(
                "{what:<44} {:>8.2} s {:>14.0} {:>7.2}x\n",
                time.as_secs_f64(),
                rate(time),
                rate(time) / rate(self.plain)
            );
        }
        out
    }
}
