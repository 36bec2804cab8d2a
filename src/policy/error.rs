//! Load and compile errors: each one names the file, line and column, and says what
//! was expected. A load reports every error it found, not only the first.

use std::fmt;
use std::path::PathBuf;

/// One problem in one place.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 0 for a problem with the path itself (a directory that cannot be read, a file
    /// that is not a regular file): there is no position to give.
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl Diagnostic {
    /// A problem with a path as a whole, not at a position in it.
    pub fn at_path(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// `file:line:col: message`, or `file: message` when there is no position, with
    /// the file shown as `file` (the caller may have joined it to the directory).
    pub fn display_as(&self, file: &std::path::Path) -> String {
        if self.line == 0 {
            format!("{}: {}", file.display(), self.message)
        } else {
            let (f, l, c) = (file.display(), self.line, self.column);
            format!("{f}:{l}:{c}: {}", self.message)
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_as(&self.file))
    }
}

/// Everything wrong with a policy directory. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadError {
    pub fn single(
        file: impl Into<PathBuf>,
        line: u64,
        column: u64,
        message: impl Into<String>,
    ) -> Self {
        LoadError {
            diagnostics: vec![Diagnostic {
                file: file.into(),
                line,
                column,
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
