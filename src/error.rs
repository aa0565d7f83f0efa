//! Errors. Inside the engine every fallible step returns an `anyhow::Error` whose chain
//! names the cause, outermost context first; a few links in that chain say what *kind* of
//! failure it is. At the library's edge the chain becomes one [`Error`] with an
//! [`ErrorKind`], which the command line maps to its exit codes and an embedder to its
//! retry policy.

use std::fmt;

/// What kind of failure an [`Error`] is: what a caller may do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Another writer owns the task: it committed a generation this writer tried to, or
    /// holds the output file's lock. Retrying will not help; this writer must stop.
    Fenced,
    /// The guest module is not the one the store's checkpoints were taken of.
    ModuleChanged,
    /// The store, the input or the output could not be reached, or failed a request.
    /// Nothing committed was lost; retrying later may work.
    StoreUnavailable,
    /// An object in the store is damaged or missing (and no older checkpoint was usable).
    Corrupt,
    /// The input or output is not what the checkpoint recorded: replaced, truncated,
    /// deleted, another task's, or of another kind (a file where an object was).
    StreamChanged,
    /// The guest failed while running: a trap, a resource limit, a broken ABI contract at
    /// run time, or a stdio program that exited with a non-zero status.
    Guest,
    /// The module cannot be run: not wasm, missing exports, features wasnap cannot
    /// snapshot faithfully (mutable tables, imported memories), a failed transform.
    InvalidGuest,
    /// Anything else: a local I/O error (a full disk), a bad configuration.
    Other,
}

/// A result whose error is wasnap's [`Error`]: what the library's functions and the
/// [`Source`](crate::Source), [`Sink`](crate::Sink) and
/// [`OutputCommit`](crate::OutputCommit) traits return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error from the engine: a kind and a message naming the cause.
pub struct Error {
    kind: ErrorKind,
    inner: anyhow::Error,
}

impl Error {
    /// What kind of failure this is: what a caller may do about it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// A link of the chain of type `E` ([`Fenced`], say, for its generation).
    pub fn downcast_ref<E: fmt::Display + fmt::Debug + Send + Sync + 'static>(&self) -> Option<&E> {
        self.inner.downcast_ref()
    }

    /// The whole chain, for callers that want to walk it.
    pub fn into_anyhow(self) -> anyhow::Error {
        self.inner
    }
}

impl From<anyhow::Error> for Error {
    fn from(inner: anyhow::Error) -> Self {
        Self {
            kind: kind_of(&inner),
            inner,
        }
    }
}

/// An I/O error from a [`Source`](crate::Source) or [`Sink`](crate::Sink) of the
/// embedder's: of kind [`ErrorKind::Other`], so `?` works on `std::io` results in their
/// methods (add context with `anyhow::Context` first to say what failed).
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        from_io(e).into()
    }
}

/// One line, outermost context first: what the command line prints. A cause that a link
/// already holds is not repeated, line breaks are folded, a long link is cut, and a cause
/// whose fix is a setting (S3's, mostly) gets a hint. Credentials in a URL
/// (`http://KEY:SECRET@host`, as an `AWS_ENDPOINT` may hold) are blanked.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_credentials(&one_line(&self.inner)))
    }
}

/// The longest text one link of a chain contributes (an S3 error carries the server's
/// whole XML body).
const MAX_LINK_CHARS: usize = 400;

/// `err`'s chain as one line, links joined by ": ". A link that the link printed before it
/// already holds is left out: object_store's and reqwest's errors print their sources
/// inside their own text, so `{:#}` would repeat one cause four times. Line breaks are
/// folded, credentials in URLs blanked, and a long link cut; the root cause is said even
/// when it was left out as part of a link that got cut. A cause whose fix is a setting
/// gets a hint.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let links: Vec<String> = err
        .chain()
        .map(|link| {
            let folded = link
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            redact_credentials(&folded).into_owned()
        })
        .collect();
    let cut = |text: &str| match text.char_indices().nth(MAX_LINK_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    };
    let mut out = String::new();
    let mut printed: Option<&str> = None;
    for link in &links {
        if printed.is_some_and(|p| p.contains(link.as_str())) {
            continue;
        }
        if printed.is_some() {
            out.push_str(": ");
        }
        out.push_str(&cut(link));
        printed = Some(link);
    }
    // The root cause, if it was inside a link that got cut (its start is how it shows).
    if let Some(root) = links.last()
        && printed != Some(root.as_str())
    {
        let start: String = root.chars().take(80).collect();
        if !out.contains(&start) {
            out.push_str(": ");
            out.push_str(&cut(root));
        }
    }
    if let Some(hint) = hint_for(&links.join("\n")) {
        out.push_str(" (");
        out.push_str(hint);
        out.push(')');
    }
    out
}

/// What to set when `text` shows a cause whose fix is a setting (S3's, mostly).
fn hint_for(text: &str) -> Option<&'static str> {
    if text.contains("URL scheme is not allowed") {
        Some("the S3 endpoint is http://: set AWS_ALLOW_HTTP=true to allow it")
    } else if text.contains("169.254.169.254") {
        Some(
            "no S3 credentials were found, so the instance metadata service was asked: set \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    } else if text.contains("NoSuchBucket") {
        Some("the bucket does not exist: create it, or name another in the URL")
    } else if text.contains("amazonaws.com")
        && (text.contains("error sending request") || text.contains("dns error"))
        && !crate::store::url::s3_endpoint_configured()
    {
        Some(
            "AWS_ENDPOINT is not set, so requests went to AWS itself: set it to use another S3 \
             server, e.g. AWS_ENDPOINT=http://127.0.0.1:9000",
        )
    } else if text.contains("the record at ") && !text.contains("time limit") {
        // A record the guest fails on (a time limit is not repeatable, so never skipped).
        Some("to go on past this record: --on-trap skip --dead-letter FILE")
    } else if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") {
        Some(
            "the S3 server refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    } else {
        None
    }
}

/// `text` with the user information of every URL in it (`scheme://USER:PASSWORD@host`)
/// replaced by `***`.
pub(crate) fn redact_credentials(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("://") || !text.contains('@') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the path, a space, a quote or a bracket.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || "\"'<>()[]{}".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                out.push_str(&authority[user_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} error: {self}", self.kind)
    }
}

impl std::error::Error for Error {}

/// The kind of `err`: a fencing or a changed module wherever it is in the chain, then an
/// unavailable store, then the outermost link that carries a kind; `Other` if none does.
/// (Context links are reached through anyhow's downcasting, which sees every layer.)
pub(crate) fn kind_of(err: &anyhow::Error) -> ErrorKind {
    if err.is::<Fenced>() || err.is::<OutputLocked>() {
        ErrorKind::Fenced
    } else if err.is::<GuestTimedOut>() {
        ErrorKind::Guest
    } else if err.is::<ModuleChanged>() {
        ErrorKind::ModuleChanged
    } else if err.is::<StoreUnavailable>() {
        ErrorKind::StoreUnavailable
    } else if let Some(error) = err.downcast_ref::<Error>() {
        error.kind
    } else if let Some(kinded) = err.downcast_ref::<Kinded>() {
        kinded.kind
    } else {
        ErrorKind::Other
    }
}

/// A link that carries only a kind and its message (its Display is the message).
#[derive(Debug)]
pub(crate) struct Kinded {
    kind: ErrorKind,
    message: String,
}

impl fmt::Display for Kinded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Kinded {}

impl Kinded {
    pub(crate) fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }
}

/// An `io::Error` as an error chain, keeping the kind of a [`Kinded`] it carries (a
/// stream's reader reports kinds through `io::Read`, which has only `io::Error`).
pub(crate) fn from_io(e: std::io::Error) -> anyhow::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Kinded>()) {
        let inner = e.into_inner().expect("checked").downcast::<Kinded>();
        return anyhow::Error::new(*inner.expect("checked"));
    }
    e.into()
}

/// A new error of `kind`.
pub(crate) fn error(kind: ErrorKind, message: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Kinded {
        kind,
        message: message.to_string(),
    })
}

/// Context that also says what kind of failure the error is.
pub(crate) trait KindContext<T> {
    fn kind_context(self, kind: ErrorKind, message: impl fmt::Display) -> anyhow::Result<T>;
    fn with_kind_context<M: fmt::Display>(
        self,
        kind: ErrorKind,
        message: impl FnOnce() -> M,
    ) -> anyhow::Result<T>;
}

impl<T> KindContext<T> for anyhow::Result<T> {
    fn kind_context(self, kind: ErrorKind, message: impl fmt::Display) -> anyhow::Result<T> {
        self.map_err(|e| {
            e.context(Kinded {
                kind,
                message: message.to_string(),
            })
        })
    }

    fn with_kind_context<M: fmt::Display>(
        self,
        kind: ErrorKind,
        message: impl FnOnce() -> M,
    ) -> anyhow::Result<T> {
        self.map_err(|e| {
            e.context(Kinded {
                kind,
                message: message().to_string(),
            })
        })
    }
}

/// `corrupt!("{what} is corrupt: …")`: a damaged store object or position.
macro_rules! corrupt {
    ($($arg:tt)*) => {
        $crate::error::error($crate::error::ErrorKind::Corrupt, format!($($arg)*))
    };
}
pub(crate) use corrupt;

/// `changed!(…)`: the input or output is not what the checkpoint recorded.
macro_rules! changed {
    ($($arg:tt)*) => {
        $crate::error::error($crate::error::ErrorKind::StreamChanged, format!($($arg)*))
    };
}
pub(crate) use changed;

/// Another writer committed the generation this one tried to commit: it owns the task now.
#[derive(Debug, thiserror::Error)]
#[error(
    "another writer owns this task: checkpoint generation {generation} was already committed \
     by a different process; this writer is fenced and stops without committing"
)]
pub struct Fenced {
    /// The generation another writer committed first (or past which it committed).
    pub generation: u64,
}

/// A guest call ran past `--call-timeout-ms` (of kind `Guest`). Unlike a trap it need not
/// happen again on the same state and record, so it is never a poison record.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuestTimedOut(pub String);

/// A record the guest failed on (a trap, or its memory limit), under `--on-trap
/// skip`: the run goes back to its newest checkpoint and passes the record by.
#[derive(Debug, thiserror::Error)]
#[error("record at input offset {offset} failed and is to be skipped: {message}")]
pub struct PoisonRecord {
    /// `Source::offset` before the record: what names it in the input.
    pub offset: u64,
    /// The guest's error, one line.
    pub message: String,
    /// Records processed up to the last checkpoint before it (those after it are replayed
    /// once the record is skipped), and checkpoints taken, since the task opened.
    pub records: u64,
    /// Checkpoints taken since the task opened, before the record.
    pub checkpoints: u64,
}

/// The guest is not the module the store's checkpoints were taken of.
#[derive(Debug, thiserror::Error)]
#[error(
    "the guest module changed since checkpoint {generation}: the store holds state of module \
     sha256 {expected}, but this guest is sha256 {actual}; refusing to restore it into a \
     different module (use a new store to start over)"
)]
pub struct ModuleChanged {
    /// The checkpoint that was about to be restored.
    pub generation: u64,
    /// The sha256 (hex) of the module the store's checkpoints were taken of.
    pub expected: String,
    /// The sha256 (hex) of the module given now.
    pub actual: String,
}

/// Another live process writes this task's output file.
#[derive(Debug, thiserror::Error)]
#[error(
    "another writer owns this task: output {} is locked by another live wasnap process",
    path.display()
)]
pub struct OutputLocked {
    /// The output file.
    pub path: std::path::PathBuf,
}

/// The store could not be reached, or failed a request: retrying later may work. Never a
/// reason to fall back to an older checkpoint (unlike a corrupt or missing object).
#[derive(Debug, thiserror::Error)]
#[error("{what} {store} is unavailable")]
pub struct StoreUnavailable {
    /// What the unreachable thing is to the run: "store", "input", "output" or "the Kafka
    /// cluster".
    pub what: &'static str,
    /// Its URL.
    pub store: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    /// An error whose text holds its source's, as object_store's and reqwest's do.
    #[derive(Debug)]
    struct Nested(&'static str, Option<Box<Nested>>);
    impl fmt::Display for Nested {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match &self.1 {
                Some(source) => write!(f, "{}: {source}", self.0),
                None => f.write_str(self.0),
            }
        }
    }
    impl std::error::Error for Nested {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|s| s as _)
        }
    }

    #[test]
    fn one_line_says_each_cause_once_folds_lines_and_hints() {
        let inner = Nested(
            "builder error",
            Some(Box::new(Nested("URL scheme is not allowed", None))),
        );
        let outer = Nested("Generic S3 error", Some(Box::new(inner)));
        let err = anyhow::Error::new(outer).context("cannot read\nmanifest 4");
        assert_eq!(
            one_line(&err),
            "cannot read manifest 4: Generic S3 error: builder error: URL scheme is not allowed \
             (the S3 endpoint is http://: set AWS_ALLOW_HTTP=true to allow it)"
        );
        let long = anyhow::anyhow!("x".repeat(1000)).context("outer");
        let line = one_line(&long);
        assert!(line.ends_with('…') && line.chars().count() == "outer: ".len() + 400 + 1);
        // A cause past the cut of a link that holds it is still said, with its hint.
        let request: &'static str = format!("GET http://host/bucket/{}", "p".repeat(400)).leak();
        let deep = Nested(request, Some(Box::new(Nested("NoSuchBucket", None))));
        let line = one_line(&anyhow::Error::new(deep).context("outer"));
        assert!(
            line.ends_with(
                "ppp…: NoSuchBucket (the bucket does not exist: create it, or name another in \
                 the URL)"
            ),
            "{line}"
        );
        // A cut never leaves part of a credential: links are blanked before they are cut.
        let secret = anyhow::anyhow!(
            "{} http://AKIAKEY:SUPERSECRET@minio:9000/b",
            "z".repeat(380)
        );
        assert!(!one_line(&secret).contains("AKIA"), "{}", one_line(&secret));
        assert_eq!(
            one_line(&anyhow::anyhow!("disk full").context("a: b")),
            "a: b: disk full"
        );
    }

    #[test]
    fn the_outermost_kind_wins_and_the_message_keeps_every_link() {
        let inner: anyhow::Result<()> = Err(corrupt!("pack p is corrupt: CRC mismatch"));
        let err: Error = inner
            .context("cannot restore checkpoint 3")
            .unwrap_err()
            .into();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert_eq!(
            err.to_string(),
            "cannot restore checkpoint 3: pack p is corrupt: CRC mismatch"
        );

        let unavailable = anyhow::anyhow!("connection refused")
            .context(StoreUnavailable {
                what: "store",
                store: "s3://b".into(),
            })
            .context("cannot read manifest 4");
        assert_eq!(Error::from(unavailable).kind(), ErrorKind::StoreUnavailable);

        let guest: anyhow::Result<()> = Err(anyhow::anyhow!("unreachable executed"));
        let err = guest
            .kind_context(ErrorKind::Guest, "the guest trapped in `process`")
            .context("the record at line 2 (byte offset 7)")
            .unwrap_err();
        assert_eq!(kind_of(&err), ErrorKind::Guest);
        assert_eq!(kind_of(&anyhow::anyhow!("disk full")), ErrorKind::Other);
        assert_eq!(kind_of(&Fenced { generation: 2 }.into()), ErrorKind::Fenced);
    }
}
