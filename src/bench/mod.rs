//! `wasnap bench`: run a guest through the real engine and report, per checkpoint, what
//! was written and what it cost, beside what the Wasman-style baseline would write.

pub mod baseline;
pub mod stdio;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::snapshot::DirtyTracking;
use crate::store::CheckpointStore;
use crate::task::{CheckpointObserver, CheckpointStats, Mode, RunConfig, RunSummary, TaskConfig};
use baseline::{BaselineSnapshot, WasmanBaseline};

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub guest: PathBuf,
    /// A file or `s3://BUCKET/KEY`.
    pub input: PathBuf,
    /// Where the output goes (a file, a directory or `s3://BUCKET/PREFIX`); a scratch
    /// file if `None`.
    pub output: Option<PathBuf>,
    pub checkpoint_every: u64,
    /// Where checkpoints go; a fresh temporary directory (local disk, fsync) if `None`.
    pub store: Option<String>,
    /// Also compute the Wasman-style baseline.
    pub baseline: bool,
    /// See [`TaskConfig::max_deltas`].
    pub max_deltas: usize,
    /// See [`TaskConfig::dirty_tracking`].
    pub dirty_tracking: DirtyTracking,
    /// See [`TaskConfig::cache_dir`]; by default beside the bench's scratch output.
    pub cache_dir: Option<PathBuf>,
}

/// One checkpoint, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointRecord {
    pub generation: u64,
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
    pub dirty_tracking: DirtyTracking,
    pub checkpoints: Vec<CheckpointRecord>,
}

struct Recorder<'a> {
    baseline: Option<WasmanBaseline>,
    /// The memory count and the baseline's figures of checkpoints captured and not yet
    /// finished.
    pending: std::collections::BTreeMap<u64, (usize, Option<BaselineSnapshot>)>,
    records: Vec<CheckpointRecord>,
    on_record: &'a mut dyn FnMut(&CheckpointRecord),
}

impl CheckpointObserver for Recorder<'_> {
    fn captured(&mut self, generation: u64, memories: &[&[u8]]) {
        // The guest is paused exactly as captured: the baseline snapshots the same memory.
        let baseline = self
            .baseline
            .as_mut()
            .map(|b| b.snapshot(&memories.concat()));
        self.pending.insert(generation, (memories.len(), baseline));
    }

    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &crate::Error>) {
        let (memories, baseline) = self.pending.remove(&generation).unwrap_or((0, None));
        let Ok(stats) = outcome else {
            return;
        };
        let record = CheckpointRecord {
            generation: stats.generation,
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
            baseline_bytes: baseline.as_ref().map(|b| b.bytes),
            baseline_full: baseline.as_ref().map(|b| b.full),
            baseline_hash_us: baseline.as_ref().map(|b| b.hash.as_micros() as u64),
            baseline_encode_us: baseline.as_ref().map(|b| b.encode.as_micros() as u64),
        };
        (self.on_record)(&record);
        self.records.push(record);
    }
}

/// Run the guest over the whole input from a fresh start, calling `on_record` after every checkpoint.
pub fn bench(
    config: &BenchConfig,
    on_record: &mut dyn FnMut(&CheckpointRecord),
) -> Result<BenchReport> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let store_url = match &config.store {
        Some(url) => url.clone(),
        None => scratch.path().join("store").display().to_string(),
    };
    let store = CheckpointStore::open(&store_url)?;
    if !store.generations()?.is_empty() {
        anyhow::bail!("bench needs an empty store, and {store_url} holds checkpoints");
    }
    let run_config = RunConfig {
        task: TaskConfig {
            mode: Mode::records(config.checkpoint_every),
            // The bench accounts for every byte put; retention would delete some of them.
            retain: usize::MAX,
            max_deltas: config.max_deltas,
            dirty_tracking: config.dirty_tracking,
            cache_dir: config.cache_dir.clone(),
            ..TaskConfig::default()
        },
        ..RunConfig::new(
            &config.guest,
            &config.input,
            (config.output.clone()).unwrap_or_else(|| scratch.path().join("output")),
        )
    };
    let mut task = run_config.open(store)?;
    let mut recorder = Recorder {
        baseline: config.baseline.then(WasmanBaseline::default),
        pending: Default::default(),
        records: Vec::new(),
        on_record,
    };
    let run = task.run(&mut recorder)?;
    Ok(BenchReport {
        run,
        dirty_tracking: config.dirty_tracking,
        checkpoints: recorder.records,
    })
}

impl BenchReport {
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
        let mut out = format!(
            "guest {guest}: {} records in {:.2}s ({:.0} records/s), {} checkpoints, final memory {}\n\n",
            self.run.records,
            secs,
            self.run.records as f64 / secs,
            c.len(),
            human_bytes(memory as f64),
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
