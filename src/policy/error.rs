//! Load and compile errors: each one names the file, line and column, and says what
//! was expected. A load reports every error it found, not only the first.

use std::fmt;
use std::path::PathBuf;

/// One problem in one place.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
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
