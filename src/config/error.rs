//! Configuration errors that point at `file:line:col`, like `nginx -t`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A problem found at a byte range of the configuration source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanError {
    pub span: Range<usize>,
    pub message: String,
}

impl SpanError {
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        SpanError {
            span,
            message: message.into(),
        }
    }
}

/// A value the configuration may not hold, and what to write instead: the message `check`
/// prints at the value's `file:line:col`. Nothing branches on it; it is for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(message: impl Into<String>) -> Invalid {
        Invalid(message.into())
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl From<String> for Invalid {
    fn from(message: String) -> Invalid {
        Invalid(message)
    }
}

impl From<Invalid> for String {
    fn from(invalid: Invalid) -> String {
        invalid.0
    }
}

/// One configuration mistake, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column; absent for errors about the file as a whole.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every mistake found in one configuration file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            position: None,
            message: message.into(),
        }])
    }

    /// Locates span errors in `source`, the text of `file`.
    pub fn located(file: &Path, source: &str, errors: Vec<SpanError>) -> Self {
        ConfigErrors(
            errors
                .into_iter()
                .map(|e| ConfigError {
                    file: file.to_owned(),
                    position: Some(line_col(source, e.span.start)),
                    message: e.message,
                })
                .collect(),
        )
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = source[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = \"é\"\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 11), (2, 6));
    }
}
