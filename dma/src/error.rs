//! The storage crate's one error type.

use std::path::PathBuf;

pub type Result<T, E = LogError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Bad bytes from a client: nothing was appended.
    #[error("corrupt record batch: {reason}")]
    CorruptBatch { reason: String },
    /// A request larger than a named limit.
    #[error("{what} of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, bytes: u64, limit: u64 },
    /// An I/O error on a file. `op` says what was being done.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write or fdatasync failed earlier: the log takes no more writes (see the module docs of
    /// `log` on fsyncgate). Reads of what was durable before still work.
    #[error("log {path} stopped taking writes after an earlier failure: {reason}")]
    Stopped { path: PathBuf, reason: String },
    /// The log was closed (its topic deleted, or the node stopping) while a read waited.
    #[error("log {path} was closed (its topic deleted, or the node stopping)")]
    Closed { path: PathBuf },
    /// The requested offset is outside [log start, log end].
    #[error("offset {offset} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange { offset: i64, log_start: i64, log_end: i64 },
}

impl LogError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: impl IntoOsError) -> LogError {
        LogError::Io { op, path: path.into(), source: source.into_os_error() }
    }

    /// Whether the cause is a full disk or quota, which an operator fixes by making room.
    pub fn is_no_space(&self) -> bool {
        match self {
            LogError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                    || matches!(
                        source.kind(),
                        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                    )
            }
            LogError::Stopped { reason, .. } => reason.contains("No space left"),
            _ => false,
        }
    }
}

/// An I/O failure as the OS reported it. glommio's errors also spell out their operation,
/// path and file descriptor ("..., op: Writing path: Some(...) with fd: Some(30)"), which
/// [`LogError::Io`] already says in words: only the OS error is kept.
pub(crate) trait IntoOsError {
    fn into_os_error(self) -> std::io::Error;
}

impl IntoOsError for std::io::Error {
    fn into_os_error(self) -> std::io::Error {
        self
    }
}

impl<T> IntoOsError for glommio::GlommioError<T> {
    fn into_os_error(self) -> std::io::Error {
        match self {
            glommio::GlommioError::EnhancedIoError { source, .. }
            | glommio::GlommioError::IoError(source) => source,
            other => other.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_says_what_failed_where_once_and_keeps_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing").join("00000000000000000000.log");
        let error = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .unwrap()
            .run(async {
                glommio::io::DmaFile::open(&missing).await.map_err(|e| LogError::io("opening", &missing, e))
            })
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("opening {}: No such file or directory (os error 2)", missing.display())
        );
        let LogError::Io { source, .. } = &error else { panic!("{error:?}") };
        assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
    }
}
