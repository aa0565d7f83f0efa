//! What the command line prints on stderr besides its final line: the library's log
//! events (warnings by default, everything with `WASNAP_LOG=debug`) and progress.

use std::fmt;
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::task::{CheckpointObserver, CheckpointStats};

/// One line per event: `wasnap: warning: …`; debug and trace lines name their module and
/// carry their fields.
pub struct Lines;

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        match *metadata.level() {
            Level::ERROR => write!(writer, "wasnap: error: ")?,
            Level::WARN => write!(writer, "wasnap: warning: ")?,
            Level::INFO => write!(writer, "wasnap: ")?,
            level => write!(writer, "wasnap: {level} {}: ", metadata.target())?,
        }
        // Fields into a string first, so credentials in a URL can be blanked.
        let mut fields = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut fields), event)?;
        writeln!(writer, "{}", crate::error::redact_credentials(&fields))
    }
}

/// Progress lines, at most one every few seconds, as checkpoints commit.
pub struct Progress {
    enabled: bool,
    /// When the run started, and the input offset of its first checkpoint.
    started: Instant,
    first_offset: Option<u64>,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(2);

    pub fn new(enabled: bool) -> Self {
        let now = Instant::now();
        Self {
            enabled,
            started: now,
            first_offset: None,
            last: now,
        }
    }
}

impl CheckpointObserver for Progress {
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &crate::Error>) {
        let Ok(stats) = outcome else { return };
        if stats.generation != generation {
            return; // merged into a later commit, reported with it
        }
        let first = *self.first_offset.get_or_insert(stats.input_offset);
        if !self.enabled || self.last.elapsed() < Self::EVERY {
            return;
        }
        self.last = Instant::now();
        let rate = (stats.input_offset - first) as f64
            / self.started.elapsed().as_secs_f64()
            / (1 << 20) as f64;
        say!(
            "wasnap: checkpoint {generation}: input at byte {} ({rate:.1} MiB/s), {} output bytes committed",
            stats.input_offset,
            stats.output_marker
        );
    }
}
