//! Plain aligned text tables and the small formatting helpers the CLI reports share.

use chrono::{DateTime, SecondsFormat, Utc};

pub struct Table {
    headers: Vec<&'static str>,
    /// Numbers are right-aligned, text left-aligned.
    right_aligned: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `columns`: (header, right-aligned).
    pub fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            right_aligned: columns.iter().map(|(_, r)| *r).collect(),
            rows: Vec::new(),
        }
    }

    /// Control characters in a cell (a hostile broker id, say) are shown escaped: they must not
    /// move the cursor or recolour the on-call engineer's terminal.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows
            .push(cells.into_iter().map(escape_controls).collect());
    }

    /// Columns separated by two spaces, each as wide as its widest cell, one line per row.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let headers: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        let mut out = String::new();
        for cells in std::iter::once(&headers).chain(&self.rows) {
            let line: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    let width = widths[i];
                    if self.right_aligned[i] {
                        format!("{cell:>width$}")
                    } else {
                        format!("{cell:<width$}")
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn escape_controls(cell: String) -> String {
    if !cell.chars().any(char::is_control) {
        return cell;
    }
    let mut escaped = String::with_capacity(cell.len() + 8);
    for c in cell.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// RFC 3339 in UTC with milliseconds: sortable, unambiguous, short enough for a table.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `850ms`, `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One line of at most `max` characters, so a long error cannot break a table. A trailing `:`
/// goes too: "HTTP 503: " is what an empty response body leaves.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim().trim_end_matches(':').to_owned();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_numbers_right_text_left() {
        let mut table = Table::new(&[("broker_id", false), ("pending", true), ("note", false)]);
        table.row(vec!["acme-freight".into(), "7".into(), "".into()]);
        table.row(vec!["b2".into(), "1200".into(), "x".into()]);
        assert_eq!(
            table.render(),
            "broker_id     pending  note\n\
             acme-freight        7\n\
             b2               1200  x\n"
        );
    }

    #[test]
    fn control_characters_in_cells_are_escaped() {
        let mut table = Table::new(&[("broker_id", false)]);
        table.row(vec!["evil\u{1b}[2J\nnext".into()]);
        assert_eq!(table.render(), "broker_id\nevil\\u{1b}[2J\\nnext\n");
    }

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(192_000), "3m12s");
        assert_eq!(duration_ms(7_500_000), "2h05m");
        assert_eq!(duration_ms(273_600_000), "3d04h");
        assert_eq!(duration_ms(-5), "0ms");
    }

    #[test]
    fn long_or_multi_line_text_becomes_one_short_line() {
        assert_eq!(one_line("HTTP 503:\nbusy", 40), "HTTP 503: busy");
        assert_eq!(one_line("abcdefgh", 5), "abcd…");
        assert_eq!(one_line("HTTP 503: ", 40), "HTTP 503");
    }
}
