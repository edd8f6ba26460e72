//! Config errors written for the person who has to fix them: the place
//! (`file:line:col`), the field (`agents[2].provider`), the value, and what is expected.

use std::fmt;

/// One problem in a config, with its place when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the config came from: a file path, an environment variable, or `<embedded>`.
    pub origin: String,
    /// 1-based line and column, when the problem has a place in a file.
    pub position: Option<(usize, usize)>,
    /// The field's path, such as `agents[2].provider`; empty for a whole-file problem.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a config; loading reports them all at once, not one per run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// A single error.
    pub fn one(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }

    /// The problems, in the order found.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Turns a byte offset in `source` into a 1-based (line, column), counting characters.
pub(crate) fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..source.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 10), (2, 4));
        assert_eq!(line_col(src, 999), (3, 1));
    }

    #[test]
    fn display_reads_like_a_compiler_error() {
        let e = ConfigError {
            origin: "metaorch.toml".into(),
            position: Some((14, 12)),
            field: "agents[2].provider".into(),
            message: "\"claud\" is not a defined provider; defined: claude, sim".into(),
        };
        assert_eq!(
            e.to_string(),
            "metaorch.toml:14:12: agents[2].provider: \"claud\" is not a defined provider; defined: claude, sim"
        );
    }
}
