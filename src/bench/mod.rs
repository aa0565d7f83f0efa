//! `wasnap bench`: run a guest through the real engine and report, per commit, what was
//! written and what it cost, beside what the Wasman-style baseline would write; and the
//! durability tax: the guest's records/s under the policy ÷ its records/s with
//! checkpoints off.
//!
//! Passes over the same input, so that nothing measured runs on the measured guest's path
//! but wasnap: the guest with checkpoints off (its output to a scratch file, timed up to
//! the end of its input, before the one checkpoint a run takes there, into memory) and the
//! guest under the policy, into the store, timed until its last commit; interleaved
//! `passes` times (off, on, off, …, on, off) with the fastest of each kind kept, so that
//! both figures of the tax are a best-of-N taken over the same minutes; and, for the
//! baseline, the guest run plainly once more, its memory handed to the baseline at the
//! input offsets of the kept pass's commits.

pub mod baseline;
mod replay;
pub mod stdio;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::snapshot::DirtyTracking;
use crate::store::CheckpointStore;
use crate::task::{CheckpointObserver, CheckpointStats, Mode, RunConfig, RunSummary, TaskConfig};
use baseline::WasmanBaseline;

/// When the last checkpoint started. In a pass with checkpoints off, the end of the input
/// (its only checkpoint); in a stdio run with no checkpoint by input, the program's exit
/// (output waiting past 8 MiB also takes one, mid-run: `guest::stdio`).
struct LastCheckpointStarted(Option<std::time::Instant>);

impl CheckpointObserver for LastCheckpointStarted {
    fn started(&mut self, _generation: u64) {
        self.0 = Some(std::time::Instant::now());
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub guest: PathBuf,
    /// A file or `s3://BUCKET/KEY`.
    pub input: PathBuf,
    /// Where the output goes (a file, a directory or `s3://BUCKET/PREFIX`); a scratch
    /// file if `None`.
    pub output: Option<PathBuf>,
    /// The policy: a checkpoint every this many records ([`crate::task::NEVER`]: not by
    /// count) and/or once this much time passed. Without `coalesce`, every checkpoint is
    /// committed on its own, so its bytes compare with the baseline's at the same moments.
    pub checkpoint_every: u64,
    pub checkpoint_interval: Option<std::time::Duration>,
    /// Merge captures the committer cannot keep up with (as `run` does).
    pub coalesce: bool,
    /// Where checkpoints go; a fresh temporary directory (local disk, fsync) if `None`.
    pub store: Option<String>,
    /// Also compute the Wasman-style baseline (one more pass, after the others).
    pub baseline: bool,
    /// Also run the guest with checkpoints off, for the durability tax.
    pub compare_off: bool,
    /// How many times to run the guest under the policy (and with checkpoints off, once
    /// more), interleaved; the fastest of each is kept. Above 1, pass K has its own store,
    /// `STORE/pass-K`, and the output must be the scratch file.
    pub passes: usize,
    /// See [`TaskConfig::max_deltas`].
    pub max_deltas: usize,
    /// See [`TaskConfig::dirty_tracking`].
    pub dirty_tracking: DirtyTracking,
    /// Where the passes' page caches go: a directory of the bench's own in it, removed at
    /// the end; by default the bench's scratch directory.
    pub cache_dir: Option<PathBuf>,
}

/// One checkpoint, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointRecord {
    pub generation: u64,
    /// Captures this commit covered: more than one where captures waiting for the
    /// committer merged (coalescing).
    pub captures: usize,
    pub input_offset: u64,
    pub memory_bytes: u64,
    pub dirty_pages: usize,
    pub zero_pages: usize,
    /// Pages hashed in the stall, and whether the kernel said which (`kernel`), or every
    /// page was hashed (`hash`); `mixed` when memories differed.
    pub hashed_pages: usize,
    pub tracker: &'static str,
    /// Of the dirty pages, how many went as deltas (XOR or zstd-prefix) and how many whole.
    pub delta_pages: usize,
    pub whole_pages: usize,
    /// Of the deltas, those against the whole page of a full chain (rebased).
    pub rebased_pages: usize,
    /// Frames copied out of sparse older packs (compaction).
    pub compacted_frames: usize,
    /// Everything put to the store for this checkpoint: pack + manifest.
    pub delta_bytes: usize,
    /// Of the pack: the dirty pages' frames, and the frames compaction copied.
    pub encoded_bytes: usize,
    pub compacted_bytes: usize,
    pub pack_bytes: usize,
    pub manifest_bytes: usize,
    /// Time the guest was paused (hashing and copying included).
    pub stall_us: u64,
    pub hash_us: u64,
    /// Off the guest's thread: compression, then pack put + output fsync + commit.
    pub encode_us: u64,
    pub put_us: u64,
    /// After the commit: publishing the output (object outputs), then retention.
    pub publish_us: u64,
    pub prune_us: u64,
    /// From the pause to the commit.
    pub commit_latency_us: u64,
    /// What the Wasman-style baseline writes for the same memory (absent with `--no-baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_full: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_hash_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_encode_us: Option<u64>,
}

pub struct BenchReport {
    pub run: RunSummary,
    /// Passes under the policy, and which (from 1) `run` and `checkpoints` come from.
    pub passes: usize,
    pub fastest_pass: usize,
    /// The same guest with checkpoints off (`compare_off`); its `elapsed` ends at the end
    /// of the input, before the one checkpoint taken there.
    pub off: Option<RunSummary>,
    /// A component's records/s under stock wasmtime, uninstrumented, with no
    /// checkpoints (`compare_off`, an input file).
    pub plain_records_per_sec: Option<f64>,
    pub dirty_tracking: DirtyTracking,
    /// One per commit.
    pub checkpoints: Vec<CheckpointRecord>,
}

/// The whole run, as `--json` prints it after the checkpoints (`"kind": "summary"`).
#[derive(Clone, Debug, Serialize)]
pub struct SummaryRecord {
    pub kind: &'static str,
    pub records: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
    /// With checkpoints off, and the ratio: the durability tax (1 is free).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_records_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tax: Option<f64>,
    /// A component under stock wasmtime (uninstrumented, no checkpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_wasmtime_records_per_sec: Option<f64>,
    pub captures: u64,
    pub commits: u64,
    /// Passes run under the policy, and which (from 1) was the fastest: the one reported.
    pub passes: usize,
    pub fastest_pass: usize,
    /// From a pause to the commit that covers it, over the commits.
    pub commit_lag_p50_us: u64,
    pub commit_lag_p99_us: u64,
    pub commit_lag_max_us: u64,
    pub bytes_written: u64,
}

/// Collects one record per commit; the baseline's figures are added after its own pass.
struct Recorder<'a> {
    /// The memory count of checkpoints captured and not yet finished.
    pending: std::collections::BTreeMap<u64, usize>,
    records: Vec<CheckpointRecord>,
    on_record: &'a mut dyn FnMut(&CheckpointRecord),
}

impl CheckpointObserver for Recorder<'_> {
    fn captured(&mut self, generation: u64, memories: &[&[u8]]) {
        self.pending.insert(generation, memories.len());
    }

    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &crate::Error>) {
        let memories = self.pending.remove(&generation).unwrap_or(0);
        let Ok(stats) = outcome else {
            return;
        };
        // A capture merged into a later one's commit: that commit is recorded once.
        if stats.generation != generation {
            return;
        }
        let record = CheckpointRecord {
            generation: stats.generation,
            captures: stats.captures,
            input_offset: stats.input_offset,
            memory_bytes: stats.memory_bytes,
            dirty_pages: stats.dirty_pages,
            zero_pages: stats.zero_pages,
            hashed_pages: stats.hashed_pages,
            tracker: match stats.kernel_tracked_memories {
                0 => "hash",
                n if n == memories => "kernel",
                _ => "mixed",
            },
            delta_pages: stats.delta_pages,
            rebased_pages: stats.rebased_pages,
            whole_pages: stats.whole_pages,
            compacted_frames: stats.compacted_frames,
            delta_bytes: stats.pack_bytes + stats.manifest_bytes,
            encoded_bytes: stats.encoded_bytes,
            compacted_bytes: stats.compacted_bytes,
            pack_bytes: stats.pack_bytes,
            manifest_bytes: stats.manifest_bytes,
            stall_us: stats.stall.as_micros() as u64,
            hash_us: stats.hash.as_micros() as u64,
            encode_us: stats.encode.as_micros() as u64,
            put_us: stats.put.as_micros() as u64,
            publish_us: stats.publish.as_micros() as u64,
            prune_us: stats.prune.as_micros() as u64,
            commit_latency_us: stats.committed_after.as_micros() as u64,
            baseline_bytes: None,
            baseline_full: None,
            baseline_hash_us: None,
            baseline_encode_us: None,
        };
        (self.on_record)(&record);
        self.records.push(record);
    }
}

/// Run the guest over the whole input from a fresh start (see the module doc for the
/// passes), calling `on_record` after every commit.
pub fn bench(
    config: &BenchConfig,
    on_record: &mut dyn FnMut(&CheckpointRecord),
) -> Result<BenchReport> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let passes = config.passes.max(1);
    if passes > 1 && config.output.is_some() {
        anyhow::bail!(
            "--passes {passes} with --output: each pass would write the same output; give \
             --passes 1, or leave the output to a scratch file"
        );
    }
    let store_url = match &config.store {
        Some(url) => url.clone(),
        None => scratch.path().join("store").display().to_string(),
    };
    // One store per pass (`pass-K` under the given one, as a worker's tasks are), each
    // checked empty, and the given one too, before anything runs.
    let root = CheckpointStore::open(&store_url).map_err(crate::Error::into_anyhow)?;
    let stores = match passes {
        1 => vec![root.clone()],
        _ => (1..=passes)
            .map(|pass| root.within(&format!("pass-{pass}")))
            .collect(),
    };
    // (With one pass, the root is that pass's store: listed once.)
    let roots = (passes > 1).then_some(&root);
    for store in roots.into_iter().chain(&stores) {
        if !store
            .generations()
            .map_err(crate::Error::into_anyhow)?
            .is_empty()
        {
            anyhow::bail!(
                "bench needs an empty store, and {} holds checkpoints",
                store.label()
            );
        }
    }
    // Each pass its own page cache (a fresh task's), removed after it: one per pass, each
    // as big as the guest's memory, would add up. Under a given --cache-dir, in a
    // directory of this bench's own (removed with it, an error too), so nothing already
    // there is touched.
    let own_caches = match &config.cache_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
            let caches = tempfile::Builder::new()
                .prefix("wasnap-bench-")
                .tempdir_in(dir)
                .with_context(|| format!("cannot create a cache directory in {}", dir.display()))?;
            Some(caches)
        }
        None => None,
    };
    let caches = own_caches.as_ref().map_or(scratch.path(), |dir| dir.path());
    let cache_of = |pass: &str| caches.join(format!("cache-{pass}"));
    let task = |mode: Mode, interval, coalesce, pass: &str| TaskConfig {
        mode,
        checkpoint_interval: interval,
        coalesce,
        // The bench accounts for every byte put; retention would delete some of them.
        retain: usize::MAX,
        max_deltas: config.max_deltas,
        dirty_tracking: config.dirty_tracking,
        cache_dir: Some(cache_of(pass)),
        ..TaskConfig::default()
    };
    let guest = RunConfig::new(&config.guest, &config.input, scratch.path())
        .load_guest()
        .map_err(crate::Error::into_anyhow)?;

    // Checkpoints off: one at the end, in memory; the output to a scratch file. Run around
    // every measured pass and the fastest kept: on a busy two-core machine one pass
    // swung the tax by up to a third either way.
    let off_pass = |pass: usize| -> Result<RunSummary> {
        let name = format!("off-{pass}");
        let off = RunConfig {
            task: task(Mode::records(crate::task::NEVER), None, false, &name),
            ..RunConfig::new(&config.guest, &config.input, scratch.path().join(&name))
        };
        let store = CheckpointStore::open("memory://").map_err(crate::Error::into_anyhow)?;
        let mut opened = off
            .open_with_guest(&guest, store)
            .map_err(crate::Error::into_anyhow)?;
        let mut end_of_input = LastCheckpointStarted(None);
        let running = std::time::Instant::now();
        let summary = opened
            .run(&mut end_of_input)
            .map_err(crate::Error::into_anyhow)
            .and_then(|mut summary| {
                // The guest's time alone: the checkpoint at the end (all of its memory)
                // is not the guest's, and a large guest's would flatter the tax.
                match (summary.checkpoints, end_of_input.0) {
                    (1, Some(ended)) => summary.elapsed = ended.duration_since(running),
                    (taken, _) => anyhow::bail!(
                        "the pass with checkpoints off took {taken} checkpoints, not one at \
                         the end of its input"
                    ),
                }
                Ok(summary)
            });
        // A long input's output, once per pass, would fill the scratch disk.
        let _ = std::fs::remove_file(scratch.path().join(&name));
        let _ = std::fs::remove_dir_all(cache_of(&name));
        summary
    };
    let faster = |best: Option<RunSummary>, next: RunSummary| match best {
        Some(best) if best.elapsed <= next.elapsed => best,
        _ => next,
    };
    let mut off = None;
    // Under the policy: (pass, summary, one record per commit), the fastest kept.
    let mut kept: Option<(usize, RunSummary, Vec<CheckpointRecord>)> = None;
    let mut no_record = |_: &CheckpointRecord| {};
    // Records are printed as they come only when there is nothing to wait for: one pass,
    // and no baseline (it comes from a later pass); else once both are known, below.
    let live = passes == 1 && !config.baseline;
    for (pass, store) in (1..=passes).zip(stores) {
        if config.compare_off {
            off = Some(faster(off, off_pass(pass)?));
        }
        // By count alone, every checkpoint is its own commit.
        let run_config = RunConfig {
            task: task(
                Mode::records(config.checkpoint_every),
                config.checkpoint_interval,
                config.coalesce,
                &pass.to_string(),
            ),
            ..RunConfig::new(
                &config.guest,
                &config.input,
                (config.output.clone())
                    .unwrap_or_else(|| scratch.path().join(format!("output-{pass}"))),
            )
        };
        let mut recorder = Recorder {
            pending: Default::default(),
            records: Vec::new(),
            on_record: if live {
                &mut *on_record
            } else {
                &mut no_record
            },
        };
        let run = run_config
            .open_with_guest(&guest, store)
            .map_err(crate::Error::into_anyhow)?
            .run(&mut recorder)
            .map_err(crate::Error::into_anyhow)?;
        let _ = std::fs::remove_dir_all(cache_of(&pass.to_string()));
        // Only the scratch output's own pass needs it.
        if config.output.is_none() {
            let _ = std::fs::remove_file(scratch.path().join(format!("output-{pass}")));
        }
        let slower = match &kept {
            Some((_, best, _)) if best.elapsed <= run.elapsed => pass,
            Some((previous, _, _)) => {
                let previous = *previous;
                kept = Some((pass, run, recorder.records));
                previous
            }
            None => {
                kept = Some((pass, run, recorder.records));
                continue;
            }
        };
        // A slower pass's scratch store: only the kept pass's is reported.
        if config.store.is_none() {
            let _ = std::fs::remove_dir_all(
                scratch.path().join("store").join(format!("pass-{slower}")),
            );
        }
    }
    if config.compare_off {
        off = Some(faster(off, off_pass(passes + 1)?));
    }
    let (fastest_pass, run, mut records) = kept.expect("at least one pass ran");

    // The baseline, at the commits' input offsets, from a plain run of the guest.
    if config.baseline {
        let offsets: Vec<u64> = records.iter().map(|r| r.input_offset).collect();
        let mut baseline = WasmanBaseline::default();
        replay::memories_at(&guest, &config.input, &offsets, &mut |i, memory| {
            let snapshot = baseline.snapshot(memory);
            let record = &mut records[i];
            record.baseline_bytes = Some(snapshot.bytes);
            record.baseline_full = Some(snapshot.full);
            record.baseline_hash_us = Some(snapshot.hash.as_micros() as u64);
            record.baseline_encode_us = Some(snapshot.encode.as_micros() as u64);
        })
        .context("the baseline's pass failed")?;
    }
    if !live {
        for record in &records {
            on_record(record);
        }
    }
    // A component, also under stock wasmtime (an input file only: this pass reads it
    // whole, as lines).
    let plain_records_per_sec = if config.compare_off
        && guest.is_component()
        && std::fs::symlink_metadata(&config.input).is_ok_and(|m| m.is_file())
    {
        Some(
            crate::component::plain::records_per_second(&config.guest, &config.input, &[])
                .context("the stock-wasmtime pass failed")?,
        )
    } else {
        None
    };
    Ok(BenchReport {
        run,
        passes,
        fastest_pass,
        off,
        plain_records_per_sec,
        dirty_tracking: config.dirty_tracking,
        checkpoints: records,
    })
}

/// The `p`-th percentile (0–100) of `values`, nearest rank.
fn percentile(values: &[u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl BenchReport {
    /// The whole run in one record.
    pub fn summary_record(&self) -> SummaryRecord {
        let per_sec = |run: &RunSummary| run.records as f64 / run.elapsed.as_secs_f64().max(1e-9);
        let lags: Vec<u64> = self
            .checkpoints
            .iter()
            .map(|r| r.commit_latency_us)
            .collect();
        let records_per_sec = per_sec(&self.run);
        let off = self.off.as_ref().map(per_sec);
        SummaryRecord {
            kind: "summary",
            records: self.run.records,
            seconds: self.run.elapsed.as_secs_f64(),
            records_per_sec,
            off_records_per_sec: off,
            tax: off.map(|off| records_per_sec / off.max(1e-9)),
            plain_wasmtime_records_per_sec: self.plain_records_per_sec,
            captures: self.checkpoints.iter().map(|r| r.captures as u64).sum(),
            commits: self.checkpoints.len() as u64,
            passes: self.passes,
            fastest_pass: self.fastest_pass,
            commit_lag_p50_us: percentile(&lags, 50.0),
            commit_lag_p99_us: percentile(&lags, 99.0),
            commit_lag_max_us: lags.iter().copied().max().unwrap_or(0),
            bytes_written: self.checkpoints.iter().map(|r| r.delta_bytes as u64).sum(),
        }
    }

    /// The human summary: totals, averages and the ratio to the baseline.
    pub fn summary(&self, guest: &str) -> String {
        let c = &self.checkpoints;
        let n = c.len().max(1) as f64;
        let sum = |f: fn(&CheckpointRecord) -> u64| c.iter().map(f).sum::<u64>();
        let max = |f: fn(&CheckpointRecord) -> u64| c.iter().map(f).max().unwrap_or(0);
        let delta = sum(|r| r.delta_bytes as u64);
        let manifests = sum(|r| r.manifest_bytes as u64);
        let memory = c.last().map_or(0, |r| r.memory_bytes);
        let secs = self.run.elapsed.as_secs_f64().max(1e-9);
        let summary = self.summary_record();
        let mut out = format!(
            "guest {guest}: {} records in {:.2}s ({:.0} records/s), {} commits of {} captures, final memory {}\n",
            self.run.records,
            secs,
            self.run.records as f64 / secs,
            summary.commits,
            summary.captures,
            human_bytes(memory as f64),
        );
        if self.passes > 1 {
            out += &format!(
                "the fastest of {} passes (pass {}), each kind; the figures below are its own\n",
                self.passes, self.fastest_pass
            );
        }
        if let (Some(off), Some(tax)) = (summary.off_records_per_sec, summary.tax) {
            out += &format!(
                "durability tax: {tax:.2}x ({:.0} records/s with checkpoints, {off:.0} with them off)\n",
                summary.records_per_sec
            );
        }
        if let Some(plain) = summary.plain_wasmtime_records_per_sec {
            out += &format!(
                "stock wasmtime, the component uninstrumented, no checkpoints: {plain:.0} records/s (wasnap with checkpoints: {:.2}x of it)\n",
                summary.records_per_sec / plain.max(1e-9)
            );
        }
        out += &format!(
            "commit lag (pause to commit): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\n",
            summary.commit_lag_p50_us as f64 / 1000.0,
            summary.commit_lag_p99_us as f64 / 1000.0,
            summary.commit_lag_max_us as f64 / 1000.0,
        );
        out += &format!("{:<24} {:>14} {:>14}\n", "", "wasnap", "baseline");
        let baseline_total: Option<u64> =
            c.iter().map(|r| r.baseline_bytes.map(|b| b as u64)).sum();
        let b = |v: Option<f64>| v.map_or("-".to_string(), human_bytes);
        out += &format!(
            "{:<24} {:>14} {:>14}\n",
            "bytes written, total",
            human_bytes(delta as f64),
            b(baseline_total.map(|t| t as f64))
        );
        out += &format!(
            "{:<24} {:>14} {:>14}\n",
            "bytes per checkpoint",
            human_bytes(delta as f64 / n),
            b(baseline_total.map(|t| t as f64 / n))
        );
        out += &format!(
            "{:<24} {:>14}\n",
            "  of which manifests",
            human_bytes(manifests as f64 / n)
        );
        out += &format!(
            "{:<24} {:>14.1}\n",
            "dirty pages per ckpt",
            sum(|r| r.dirty_pages as u64) as f64 / n
        );
        let kernel = c.iter().filter(|r| r.tracker == "kernel").count();
        out += &format!(
            "{:<24} {:>14.1}   dirty tracking {}: the kernel's record at {kernel} of {} checkpoints\n",
            "hashed pages per ckpt",
            sum(|r| r.hashed_pages as u64) as f64 / n,
            self.dirty_tracking,
            c.len(),
        );
        let ms = |us: f64| format!("{:.2} ms", us / 1000.0);
        out += &format!(
            "{:<24} {:>14}\n",
            "stall, mean",
            ms(sum(|r| r.stall_us) as f64 / n)
        );
        out += &format!(
            "{:<24} {:>14}\n",
            "stall, max",
            ms(max(|r| r.stall_us) as f64)
        );
        let baseline_hash: Option<u64> = c.iter().map(|r| r.baseline_hash_us).sum();
        out += &format!(
            "{:<24} {:>14} {:>14}\n",
            "hash, mean",
            ms(sum(|r| r.hash_us) as f64 / n),
            baseline_hash.map_or("-".into(), |h| ms(h as f64 / n))
        );
        for (what, us) in [
            ("encode, mean", sum(|r| r.encode_us)),
            ("put (pack+output+commit)", sum(|r| r.put_us)),
            ("publish output, mean", sum(|r| r.publish_us)),
            ("prune, mean", sum(|r| r.prune_us)),
            ("pause to commit, mean", sum(|r| r.commit_latency_us)),
        ] {
            out += &format!("{what:<24} {:>14}\n", ms(us as f64 / n));
        }
        if let Some(total) = baseline_total {
            out += &format!(
                "\nwasnap wrote {:.2}x {} bytes than the baseline (full gzip every 5th, FNV-64a 4 KiB deltas otherwise)\n",
                if delta <= total {
                    total as f64 / delta.max(1) as f64
                } else {
                    delta as f64 / total.max(1) as f64
                },
                if delta <= total { "fewer" } else { "MORE" },
            );
        }
        out
    }
}

pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
