//! Undoing nginx's value escaping.

use std::borrow::Cow;

use memchr::memchr;

use crate::format::Escape;

/// Decodes `raw` as written with `escape`. Borrowed when there is no
/// backslash. Malformed escapes are kept as written; decoded bytes that are
/// not UTF-8 become U+FFFD.
pub(crate) fn decode(raw: &str, escape: Escape) -> Cow<'_, str> {
    if escape == Escape::None || memchr(b'\\', raw.as_bytes()).is_none() {
        return Cow::Borrowed(raw);
    }
    match escape {
        Escape::Default => decode_default(raw),
        Escape::Json => Cow::Owned(decode_json(raw)),
        Escape::None => Cow::Borrowed(raw),
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `\xHH` → byte.
fn decode_default(raw: &str) -> Cow<'_, str> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let (Some(h), Some(l)) = (
                b.get(i + 2).copied().and_then(hex),
                b.get(i + 3).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// JSON string escapes.
fn decode_json(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(&(_, e)) = chars.peek() else {
            out.push('\\');
            break;
        };
        let simple = match e {
            '"' => Some('"'),
            '\\' => Some('\\'),
            '/' => Some('/'),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            _ => None,
        };
        if let Some(s) = simple {
            out.push(s);
            chars.next();
            continue;
        }
        if e == 'u'
            && let Some(hi) = hex4(raw, i + 2)
        {
            chars.next();
            for _ in 0..4 {
                chars.next();
            }
            let mut code = u32::from(hi);
            // A surrogate pair: \uD83D\uDE00.
            if (0xD800..0xDC00).contains(&hi)
                && raw.get(i + 6..i + 8) == Some("\\u")
                && let Some(lo) = hex4(raw, i + 8)
                && (0xDC00..0xE000).contains(&lo)
            {
                for _ in 0..6 {
                    chars.next();
                }
                code = 0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00);
            }
            out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
            continue;
        }
        out.push('\\');
    }
    out
}

fn hex4(s: &str, at: usize) -> Option<u16> {
    let b = s.as_bytes().get(at..at + 4)?;
    b.iter()
        .try_fold(0u16, |acc, &c| Some(acc << 4 | u16::from(hex(c)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_escaping() {
        assert!(matches!(decode("plain", Escape::Default), Cow::Borrowed(_)));
        assert_eq!(decode(r"a\x22b\x5Cc", Escape::Default), "a\"b\\c");
        assert_eq!(decode(r"caf\xC3\xA9", Escape::Default), "café");
        assert_eq!(decode(r"bad\xZZ\x4", Escape::Default), r"bad\xZZ\x4");
        assert_eq!(decode(r"\xFF", Escape::Default), "\u{FFFD}");
        assert_eq!(decode(r"a\x22", Escape::None), r"a\x22");
    }

    #[test]
    fn json_escaping() {
        assert_eq!(decode(r#"a\"b\\c\n\u0001"#, Escape::Json), "a\"b\\c\n\u{1}");
        assert_eq!(decode(r"\uD83D\uDE00!", Escape::Json), "😀!");
        assert_eq!(decode(r"\uD83D", Escape::Json), "\u{FFFD}");
        assert_eq!(decode(r"\q\", Escape::Json), r"\q\");
        assert_eq!(decode(r"\u12", Escape::Json), r"\u12");
    }
}
