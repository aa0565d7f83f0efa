//! Per-task figures of a worker, kept up to date by each task's checkpoints and served in
//! Prometheus' text format at `http://ADDR/metrics` (`wasnap worker --metrics ADDR`).
//!
//! Every figure is as of the task's newest committed checkpoint, except the lag, which is
//! read from the broker when the page is asked for: records in the partition past that
//! checkpoint (what a restore there would process again, or has yet to process).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::TopicUrl;
use crate::Error;
use crate::stream::kafka::Quiet;
use crate::task::{CheckpointObserver, CheckpointStats};

/// The figures of every task this worker runs.
pub struct Metrics {
    input: TopicUrl,
    tasks: Mutex<BTreeMap<i32, Arc<TaskFigures>>>,
    /// Reads the partitions' ends for the lag (made at the first scrape).
    ends: Mutex<Option<BaseConsumer<Quiet>>>,
}

/// One task's figures.
pub struct TaskFigures {
    figures: Mutex<Figures>,
}

#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub state: State,
    /// The newest committed generation, and the input offset it resumes at.
    pub generation: u64,
    pub input_offset: Option<u64>,
    pub checkpoints: u64,
    /// Packs and manifests written.
    pub written_bytes: u64,
    pub last_pack_bytes: u64,
    pub last_pause: Duration,
    /// From the pause to the commit.
    pub last_commit: Duration,
    /// Input records processed by this worker, as of the newest checkpoint.
    pub records: u64,
    /// Input records per second, over at least `RATE_WINDOW` up to the newest checkpoint.
    pub records_per_second: f64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// The input offset the task was opened at.
    opened_at: u64,
    /// Where the rate's window starts: an input offset and when a checkpoint reached it.
    window: Option<(u64, Instant)>,
}

/// The shortest span a records/s figure is taken over: checkpoints that commit together
/// (two in flight) would otherwise give absurd rates.
const RATE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    /// Restoring its checkpoint (or starting fresh).
    #[default]
    Opening,
    Running,
    /// Failed; restarted after a delay while the partition stays assigned.
    Failed,
}

impl Metrics {
    pub(crate) fn new(input: &TopicUrl) -> Self {
        Self {
            input: input.clone(),
            tasks: Mutex::new(BTreeMap::new()),
            ends: Mutex::new(None),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, BTreeMap<i32, Arc<TaskFigures>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The figures of the task of `partition` (new ones if it has none).
    pub fn task(&self, partition: i32) -> Arc<TaskFigures> {
        Arc::clone(self.tasks().entry(partition).or_insert_with(|| {
            Arc::new(TaskFigures {
                figures: Mutex::new(Figures::default()),
            })
        }))
    }

    /// Forget a task that left this worker.
    pub fn remove(&self, partition: i32) {
        self.tasks().remove(&partition);
    }

    /// Every task's figures, by partition.
    pub fn snapshot(&self) -> BTreeMap<i32, Figures> {
        self.tasks()
            .iter()
            .map(|(p, t)| (*p, t.figures().clone()))
            .collect()
    }

    /// The end of each partition (one past its last committed record), where the broker
    /// answers; `None` where it does not.
    fn partition_ends(&self, partitions: impl Iterator<Item = i32>) -> BTreeMap<i32, i64> {
        let url = self.input.at(0);
        let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        if ends.is_none() {
            *ends = url.consumer().ok();
        }
        let Some(consumer) = ends.as_ref() else {
            return BTreeMap::new();
        };
        partitions
            .filter_map(|p| {
                let (_, end) = consumer
                    .fetch_watermarks(&url.topic, p, Duration::from_secs(2))
                    .ok()?;
                Some((p, end))
            })
            .collect()
    }

    /// The page Prometheus reads.
    pub fn render(&self) -> String {
        let tasks = self.snapshot();
        let ends = self.partition_ends(tasks.keys().copied());
        let topic = &self.input.topic;
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (i32, f64)>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (partition, value) in values {
                    let _ = writeln!(
                        out,
                        "{name}{{topic=\"{topic}\",partition=\"{partition}\"}} {value}"
                    );
                }
            };
        let per = |f: &dyn Fn(&Figures) -> f64| -> Vec<(i32, f64)> {
            tasks.iter().map(|(p, t)| (*p, f(t))).collect()
        };
        family(
            "wasnap_task_up",
            "gauge",
            "1 while the task runs, 0 while it opens or waits to restart after a failure.",
            &mut per(&|t| f64::from(u8::from(t.state == State::Running))).into_iter(),
        );
        family(
            "wasnap_task_generation",
            "gauge",
            "The task's newest committed checkpoint.",
            &mut per(&|t| t.generation as f64).into_iter(),
        );
        family(
            "wasnap_task_input_offset",
            "gauge",
            "The input offset the newest checkpoint resumes at.",
            &mut per(&|t| t.input_offset.unwrap_or(0) as f64).into_iter(),
        );
        let lag: Vec<(i32, f64)> = tasks
            .iter()
            .filter_map(|(p, t)| {
                let end = *ends.get(p)?;
                Some((*p, (end - t.input_offset? as i64).max(0) as f64))
            })
            .collect();
        family(
            "wasnap_task_lag_records",
            "gauge",
            "Records in the partition past the newest checkpoint.",
            &mut lag.into_iter(),
        );
        family(
            "wasnap_task_records_total",
            "counter",
            "Input records the task processed on this worker, as of its newest checkpoint.",
            &mut per(&|t| t.records as f64).into_iter(),
        );
        family(
            "wasnap_task_records_per_second",
            "gauge",
            "Input records per second between the two newest checkpoints.",
            &mut per(&|t| t.records_per_second).into_iter(),
        );
        family(
            "wasnap_task_checkpoints_total",
            "counter",
            "Checkpoints committed by this worker.",
            &mut per(&|t| t.checkpoints as f64).into_iter(),
        );
        family(
            "wasnap_task_written_bytes_total",
            "counter",
            "Bytes of packs and manifests this worker wrote for the task.",
            &mut per(&|t| t.written_bytes as f64).into_iter(),
        );
        family(
            "wasnap_task_last_checkpoint_bytes",
            "gauge",
            "Bytes of the newest checkpoint's pack.",
            &mut per(&|t| t.last_pack_bytes as f64).into_iter(),
        );
        family(
            "wasnap_task_last_pause_seconds",
            "gauge",
            "How long the newest checkpoint paused the guest.",
            &mut per(&|t| t.last_pause.as_secs_f64()).into_iter(),
        );
        family(
            "wasnap_task_last_commit_seconds",
            "gauge",
            "From the newest checkpoint's pause to its commit.",
            &mut per(&|t| t.last_commit.as_secs_f64()).into_iter(),
        );
        family(
            "wasnap_task_failures_total",
            "counter",
            "Times the task failed on this worker (and was restarted).",
            &mut per(&|t| t.failures as f64).into_iter(),
        );
        let process = ProcessFigures::read();
        let (none, this_topic) = (String::new(), format!("{{topic=\"{topic}\"}}"));
        let gauges = [
            (
                "wasnap_tasks",
                "Tasks this worker runs.",
                &this_topic,
                tasks.len() as u64,
            ),
            (
                "wasnap_process_resident_bytes",
                "Resident memory of the worker.",
                &none,
                process.resident_bytes,
            ),
            (
                "wasnap_process_peak_resident_bytes",
                "Peak resident memory of the worker.",
                &none,
                process.peak_resident_bytes,
            ),
            (
                "wasnap_process_threads",
                "Threads of the worker.",
                &none,
                process.threads,
            ),
        ];
        for (name, help, labels, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}"
            );
        }
        out
    }
}

impl TaskFigures {
    fn figures(&self) -> MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn opening(&self) {
        self.figures().state = State::Opening;
    }

    /// The task was opened at `generation` (0: fresh), its input at `offset`.
    pub fn running(&self, generation: u64, offset: u64) {
        let mut figures = self.figures();
        figures.state = State::Running;
        figures.generation = generation;
        figures.opened_at = offset;
        figures.records = 0;
        figures.window = Some((offset, Instant::now()));
    }

    pub fn failed(&self, error: &str) {
        let mut figures = self.figures();
        if figures.state != State::Failed {
            figures.failures += 1;
        }
        figures.state = State::Failed;
        figures.last_error = Some(error.to_string());
    }

    /// An observer that keeps these figures up to date.
    pub fn observer(self: &Arc<Self>) -> FiguresObserver {
        FiguresObserver(Arc::clone(self))
    }
}

/// Updates a task's figures after every checkpoint.
pub struct FiguresObserver(Arc<TaskFigures>);

impl CheckpointObserver for FiguresObserver {
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &Error>) {
        let Ok(stats) = outcome else { return };
        // Counted once, at the commit a merged capture's answer shares.
        if stats.generation != generation {
            return;
        }
        let mut figures = self.0.figures();
        let now = Instant::now();
        match figures.window {
            Some((offset, since)) if now.duration_since(since) >= RATE_WINDOW => {
                figures.records_per_second = stats.input_offset.saturating_sub(offset) as f64
                    / now.duration_since(since).as_secs_f64();
                figures.window = Some((stats.input_offset, now));
            }
            Some(_) => {}
            None => figures.window = Some((stats.input_offset, now)),
        }
        figures.records = stats.input_offset.saturating_sub(figures.opened_at);
        figures.generation = generation;
        figures.input_offset = Some(stats.input_offset);
        figures.checkpoints += 1;
        figures.written_bytes += (stats.pack_bytes + stats.manifest_bytes) as u64;
        figures.last_pack_bytes = stats.pack_bytes as u64;
        figures.last_pause = stats.stall;
        figures.last_commit = stats.committed_after;
    }
}

/// The process's memory and threads, from `/proc/self/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessFigures {
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    pub threads: u64,
}

impl ProcessFigures {
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Self {
            resident_bytes: field("VmRSS:") * 1024,
            peak_resident_bytes: field("VmHWM:") * 1024,
            threads: field("Threads:"),
        }
    }
}

/// Serve `metrics` at `http://addr/metrics` on a thread of its own; returns the address
/// bound (port 0 picks a free one).
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(err) = answer(stream, &metrics) {
                    tracing::debug!("metrics request: {err}");
                }
            }
        })
        .context("cannot start the metrics thread")?;
    tracing::info!("metrics at http://{bound}/metrics");
    Ok(bound)
}

fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", metrics.render()),
        _ => ("404 Not Found", "try /metrics\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(generation: u64, input_offset: u64) -> CheckpointStats {
        CheckpointStats {
            generation,
            input_offset,
            pack_bytes: 1000,
            manifest_bytes: 24,
            stall: Duration::from_millis(2),
            ..Default::default()
        }
    }

    #[test]
    fn figures_follow_the_checkpoints_and_render_for_prometheus() {
        let metrics = Metrics::new(&TopicUrl {
            // Nothing listens here: the lag is left out, the rest is served.
            brokers: "127.0.0.1:1".into(),
            topic: "words".into(),
        });
        let task = metrics.task(3);
        task.running(7, 40);
        let mut observer = task.observer();
        observer.finished(8, Ok(&stats(8, 100)));
        // 9 merged into 10's commit: counted once, with 10.
        observer.finished(9, Ok(&stats(10, 250)));
        observer.finished(10, Ok(&stats(10, 250)));
        let figures = metrics.snapshot()[&3].clone();
        assert_eq!((figures.generation, figures.input_offset), (10, Some(250)));
        assert_eq!((figures.checkpoints, figures.written_bytes), (2, 2048));
        assert_eq!(figures.records, 210);
        assert_eq!(
            figures.records_per_second, 0.0,
            "no rate before a whole window"
        );
        task.figures().window = Some((40, Instant::now() - RATE_WINDOW * 2));
        observer.finished(11, Ok(&stats(11, 290)));
        let rate = metrics.snapshot()[&3].records_per_second;
        assert!(
            (100.0..=125.0).contains(&rate),
            "250 records over ~2 s: {rate}"
        );
        let page = metrics.render();
        assert!(
            page.contains("wasnap_task_generation{topic=\"words\",partition=\"3\"} 11\n"),
            "{page}"
        );
        assert!(
            page.contains("wasnap_task_records_total{topic=\"words\",partition=\"3\"} 250\n"),
            "{page}"
        );
        assert!(
            page.contains("wasnap_task_up{topic=\"words\",partition=\"3\"} 1\n"),
            "{page}"
        );
        assert!(page.contains("wasnap_tasks{topic=\"words\"} 1\n"), "{page}");
        assert!(!page.contains("wasnap_task_lag_records{"), "{page}");
        task.failed("boom");
        task.failed("boom again");
        assert_eq!(
            metrics.snapshot()[&3].failures,
            1,
            "one failure until it runs again"
        );
        metrics.remove(3);
        assert!(metrics.snapshot().is_empty());
    }

    #[test]
    fn the_page_is_served_over_http() {
        let metrics = Arc::new(Metrics::new(&TopicUrl {
            brokers: "127.0.0.1:1".into(),
            topic: "t".into(),
        }));
        metrics.task(0).running(1, 0);
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics).unwrap();
        let get = |path: &str| {
            let mut stream = TcpStream::connect(addr).unwrap();
            write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        };
        let page = get("/metrics");
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(
            page.contains("wasnap_task_up{topic=\"t\",partition=\"0\"} 1"),
            "{page}"
        );
        assert!(page.contains("wasnap_process_resident_bytes "), "{page}");
        assert!(get("/other").starts_with("HTTP/1.1 404"));
    }
}
