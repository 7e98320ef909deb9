//! The one error type of every task.

use std::fmt;
use std::path::Path;

/// Why a task failed.
#[derive(Debug)]
pub enum Error {
    /// Bad command line; main prints the usage after it.
    Usage(String),
    /// Reading or writing a file failed.
    Io {
        /// The file or directory.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An input is not what the task needs (not a .wasm, a template line not found, ...).
    Invalid(String),
    /// `k8s-envoy --check` found generated files that differ from what would be generated.
    Drift(Vec<String>),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Invalid(m) => f.write_str(m),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Drift(files) => write!(
                f,
                "generated files are out of date: {}; run `cargo run -p xtask -- k8s-envoy`",
                files.join(", ")
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
