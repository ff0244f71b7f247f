//! How the CLI prints results: aligned text tables for people, JSON (one document, or one object
//! per line for streams) for scripts.

use std::io::Write;

use serde::Serialize;

/// Text tables or JSON, chosen by `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// A table with a header row (none if no headers are given); every column as wide as its widest
/// cell, two spaces apart.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, each line ending in a newline, no trailing spaces.
    pub fn render(&self) -> String {
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let all = || (!headers.is_empty()).then_some(&headers).into_iter().chain(&self.rows);
        let columns = all().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| all().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in all() {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', widths[c].saturating_sub(cell.chars().count())));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `-` for an absent number, like Kafka's scripts.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Prints `value` as pretty JSON (`--json`) or `human` text, to stdout.
pub fn emit<T: Serialize>(format: Format, value: &T, human: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    let text = match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(value)?;
            s.push('\n');
            s
        }
        Format::Table => human(value),
    };
    write_stdout(text.as_bytes()).map(drop)
}

/// Writes to stdout; `false` if it was closed (`| head`), which is not an error.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_without_trailing_spaces() {
        let mut t = Table::new(&["TOPIC", "PARTITIONS"]);
        t.row(vec!["readings".into(), "2".into()]);
        t.row(vec!["a".into(), "10".into()]);
        assert_eq!(t.render(), "TOPIC     PARTITIONS\nreadings  2\na         10\n");
    }
}
