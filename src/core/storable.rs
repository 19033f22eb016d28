//! Text from outside (a broker's response body, an error message that quotes input) made safe to
//! store and log: valid UTF-8, no NUL or other control characters, within a byte cap. Postgres
//! `text` cannot hold NUL, and a control character in a log line or a terminal is a trap for
//! whoever reads it at 2am. Pure: no I/O.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Text that Postgres accepts in a `text` column and that prints on one line: lossily decoded,
/// control characters (NUL, newlines, escapes, C1) written as `\u{..}` escapes, and at most
/// `max_bytes` long (cut at a character boundary, marked with `…`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorableText(String);

/// Marks a cut. Three bytes in UTF-8.
const CUT: &str = "…";

impl StorableText {
    /// From raw bytes (e.g. a response body): invalid UTF-8 becomes U+FFFD.
    pub fn from_bytes_lossy(bytes: &[u8], max_bytes: usize) -> StorableText {
        StorableText::from_text(&String::from_utf8_lossy(bytes), max_bytes)
    }

    /// From text that may hold anything (e.g. an error message quoting input).
    pub fn from_text(text: &str, max_bytes: usize) -> StorableText {
        StorableText(storable(text, max_bytes).into_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StorableText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for StorableText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// `text` unchanged when it is already storable and short enough (no allocation), else escaped
/// and cut as described on [`StorableText`].
pub fn storable(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes && !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    // Escape piece by piece; remember the last piece boundary that leaves room for the marker,
    // and cut there as soon as the output is over the cap.
    let budget = max_bytes.saturating_sub(CUT.len());
    let mut out = String::with_capacity(text.len().min(max_bytes) + CUT.len());
    let mut last_fit = 0;
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
        if out.len() > max_bytes {
            out.truncate(last_fit);
            if max_bytes >= CUT.len() {
                out.push_str(CUT);
            }
            return Cow::Owned(out);
        }
        if out.len() <= budget {
            last_fit = out.len();
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_kept_as_is() {
        assert!(matches!(storable("HTTP 500: oops", 100), Cow::Borrowed(_)));
        assert_eq!(StorableText::from_text("héllo", 100).as_str(), "héllo");
    }

    #[test]
    fn nul_and_control_characters_are_escaped() {
        let text = StorableText::from_bytes_lossy(b"a\0b\nc\x1b[31m\x7f", 100);
        assert_eq!(text.as_str(), "a\\u{0}b\\u{a}c\\u{1b}[31m\\u{7f}");
        assert!(!text.contains('\0'));
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let text = StorableText::from_bytes_lossy(&[b'o', 0xff, 0xfe, b'k'], 100);
        assert_eq!(text.as_str(), "o\u{fffd}\u{fffd}k");
    }

    #[test]
    fn long_text_is_cut_within_the_cap_at_a_char_boundary() {
        let text = StorableText::from_text(&"é".repeat(100), 11);
        assert!(text.len() <= 11, "{} bytes", text.len());
        assert!(text.ends_with(CUT));
        let escaped = StorableText::from_bytes_lossy(&[0u8; 100], 20);
        assert!(escaped.len() <= 20);
        assert!(escaped.starts_with("\\u{0}"));
    }

    #[test]
    fn tiny_caps_never_overflow() {
        for cap in 0..8 {
            for input in ["", "a", "abcdefghij", "\0\0\0", "éééé"] {
                let text = StorableText::from_text(input, cap);
                assert!(text.len() <= cap, "{input:?} cap {cap}: {text:?}");
            }
        }
    }
}
