use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// `Result` with flowgate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is; the runtime acts on it.
///
/// | kind | runtime reaction |
/// |---|---|
/// | `Transient` | retry with exponential backoff and jitter, bounded budget |
/// | `Throttled` | back off (honouring `retry_after`), lower sink concurrency, count it |
/// | `Poison` | the record can never succeed: dead-letter it, then acknowledge it |
/// | `Fatal` | drain, write the final checkpoint, stop with this error |
/// | `Config` | refuse to start; the message names the setting |
/// | `Fenced` | a newer owner exists (lease or generation): drop the work, never commit it |
/// | `Corrupt` | stored state cannot be read: refuse to start, name the file or key |
/// | `Unsupported` | the component does not offer this operation (see its capabilities) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A temporary failure (network blip, broker restarting): retry.
    Transient,
    /// The broker or sink asked us to slow down (rate limits, `QueueFull`,
    /// `ProvisionedThroughputExceeded`).
    Throttled,
    /// This record can never be processed (undecodable, permanently rejected, too large).
    Poison,
    /// The pipeline cannot continue.
    Fatal,
    /// Invalid or missing configuration.
    Config,
    /// The writer lost ownership (stale generation or lease counter).
    Fenced,
    /// Stored state is unreadable or belongs to something else.
    Corrupt,
    /// The operation is not offered by this component.
    Unsupported,
}

impl ErrorKind {
    /// Whether retrying the same operation may succeed.
    pub fn is_temporary(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Throttled)
    }

    /// Stable lowercase name, used in metrics labels and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Poison => "poison",
            ErrorKind::Fatal => "fatal",
            ErrorKind::Config => "config",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one error type of flowgate. Adapter crates keep their own error enums and convert
/// them into this in one mapping function per crate.
///
/// The message says what failed; [`Error::with_context`] adds where (topic, file, key…);
/// the hint (if any) says how to fix it.
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    context: Vec<(&'static str, String)>,
    hint: Option<Cow<'static, str>>,
    retry_after: Option<Duration>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of a kind.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            context: Vec::new(),
            hint: None,
            retry_after: None,
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::Transient`].
    pub fn transient(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Transient, message)
    }

    /// Shorthand for [`ErrorKind::Throttled`].
    pub fn throttled(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Throttled, message)
    }

    /// Shorthand for [`ErrorKind::Poison`].
    pub fn poison(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Poison, message)
    }

    /// Shorthand for [`ErrorKind::Fatal`].
    pub fn fatal(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Fatal, message)
    }

    /// Shorthand for [`ErrorKind::Config`].
    pub fn config(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// Adds a `key=value` pair naming what failed (topic, path, partition…).
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Adds a sentence saying how to fix it.
    pub fn with_hint(mut self, hint: impl Into<Cow<'static, str>>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// For throttles: how long the broker asked us to wait.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying may succeed (transient or throttled).
    pub fn is_temporary(&self) -> bool {
        self.kind.is_temporary()
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `key=value` context pairs.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// How long to wait before retrying, if the broker said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Same kind, message, context and hint; the source is flattened into text so the
    /// copy can be sent to several places (dead-letter headers, logs, the final result).
    pub fn duplicate(&self) -> Error {
        let mut e = Error::new(self.kind, self.message.clone());
        e.context = self.context.clone();
        e.hint = self.hint.clone();
        e.retry_after = self.retry_after;
        if let Some(src) = &self.source {
            e.context.push(("cause", src.to_string()));
        }
        e
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if !self.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str(")")?;
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_what_failed_and_how_to_fix_it() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad magic");
        let e = Error::new(
            ErrorKind::Corrupt,
            "checkpoint file is not a flowgate store",
        )
        .with_context("path", "/data/flowgate.redb")
        .with_source(io)
        .with_hint("move the file away or point `store.path` elsewhere");
        assert_eq!(
            e.to_string(),
            "corrupt: checkpoint file is not a flowgate store (path=/data/flowgate.redb): bad magic; \
             move the file away or point `store.path` elsewhere"
        );
        assert!(!e.is_temporary());
        assert!(Error::throttled("slow down").is_temporary());
        assert!(e.duplicate().to_string().contains("cause=bad magic"));
    }
}
