//! Exactly-once streams: an input whose position is a byte offset, and an output that
//! can be made durable up to a flush marker and cut back to it.

pub mod sink;
pub mod source;

pub use sink::FileSink;
pub use source::LineSource;
