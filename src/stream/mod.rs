//! Exactly-once streams: the `Source` and `Sink` seams, and their implementations (local
//! files; objects in object storage; Kafka partitions). `open_source` and `open_sink`
//! pick one by the `--input` and `--output` argument.

pub mod kafka;
pub mod multi;
pub mod object_input;
pub mod object_output;
pub mod sink;
pub mod source;

use std::path::Path;

pub use multi::MultiSink;
pub use object_input::ObjectSource;
pub use object_output::ObjectSink;
pub use sink::{FileSink, OutputCommit, OutputFlush, Sink};
pub use source::{ByteInput, ByteLines, LineSource, Polled, Source};

/// Whether an `--input`/`--output` argument names object storage rather than a local file.
pub fn is_object_url(arg: &Path) -> bool {
    let arg = arg.to_string_lossy();
    arg.starts_with("s3://") || arg.starts_with("file://")
}

/// Whether an `--input`/`--output` argument names a Kafka partition.
pub fn is_kafka_url(arg: &Path) -> bool {
    arg.to_string_lossy().starts_with("kafka://")
}

/// The input `--input` names: `s3://BUCKET/KEY` is an object and
/// `kafka://HOST:PORT/TOPIC/PARTITION` a partition (each must exist), `file:///PATH` or a
/// plain path a local file. The task positions it.
pub fn open_source(input: &Path) -> Result<Box<dyn Source>, crate::Error> {
    let arg = input.to_string_lossy();
    if arg.starts_with("s3://") {
        return Ok(Box::new(ObjectSource::open_object(&arg)?));
    }
    if is_kafka_url(input) {
        return Ok(Box::new(kafka::KafkaSource::open(&arg)?));
    }
    let path = match arg.strip_prefix("file://") {
        Some(path) => Path::new(path),
        None => input,
    };
    Ok(Box::new(LineSource::open_file(path)))
}

/// The output `--output` names: `s3://BUCKET/PREFIX`, `file:///DIR` and an existing
/// directory hold parts (`object_output`); `kafka://HOST:PORT/TOPIC[/PARTITION]` is a
/// partition (`kafka`); any other path is a file, locked against a second writer.
pub fn open_sink(output: &Path) -> Result<Box<dyn Sink>, crate::Error> {
    Ok(match OutputKind::of(output) {
        OutputKind::Kafka => Box::new(kafka::KafkaSink::open(&output.to_string_lossy())?),
        OutputKind::Parts => Box::new(ObjectSink::open(&output.to_string_lossy())?),
        OutputKind::File => Box::new(FileSink::open(output)?),
    })
}

/// What kind of output an `--output` names: one rule for `run`, which writes it, and
/// `cat`, which reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutputKind {
    /// `kafka://HOST:PORT/TOPIC[/PARTITION]`.
    Kafka,
    /// `s3://BUCKET/PREFIX`, `file:///DIR` or an existing directory: output parts.
    Parts,
    /// Any other path: one file.
    File,
}

impl OutputKind {
    pub(crate) fn of(output: &Path) -> Self {
        if is_kafka_url(output) {
            OutputKind::Kafka
        } else if is_object_url(output) || output.is_dir() {
            OutputKind::Parts
        } else {
            OutputKind::File
        }
    }
}
