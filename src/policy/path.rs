//! Request-path normalisation (SPEC step 1). Policy matching sees only the normalised path;
//! anything that two servers could read two ways is refused as ambiguous instead of guessed.

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Ambiguity {
    NotAbsolute,
    EncodedSlash,
    Backslash,
    EncodedDotSegment,
    Nul,
    InvalidUtf8,
    BadPercent,
    AboveRoot,
}

impl fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ambiguity::NotAbsolute => "the path does not start with \"/\"",
            Ambiguity::EncodedSlash => "the path contains an encoded \"/\" (%2F)",
            Ambiguity::Backslash => "the path contains a backslash, raw or encoded",
            Ambiguity::EncodedDotSegment => {
                "the path contains a percent-encoded \".\" or \"..\" segment"
            }
            Ambiguity::Nul => "the path contains a NUL byte",
            Ambiguity::InvalidUtf8 => "the path decodes to invalid UTF-8",
            Ambiguity::BadPercent => "the path contains a malformed percent-escape",
            Ambiguity::AboveRoot => "the path climbs above the root with \"..\"",
        })
    }
}

/// Whether the path is already normal, in one pass over its bytes: no escape, backslash or
/// NUL, no empty segment (`//`) and no `.` or `..` segment (dots inside names, `a.json`, are
/// fine).
fn is_plain(b: &[u8]) -> bool {
    let mut seg_start = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' | b'\\' | 0 => return false,
            b'/' => {
                if i > 0 && !segment_ok(&b[seg_start..i]) {
                    return false;
                }
                seg_start = i + 1;
            }
            _ => {}
        }
    }
    // The last segment may be empty (a trailing slash) but not a dot segment.
    let last = &b[seg_start..];
    last != b"." && last != b".."
}

fn segment_ok(seg: &[u8]) -> bool {
    !seg.is_empty() && seg != b"." && seg != b".."
}

/// Whether an escaped byte is decoded in the normal form. Stores decode every escape of a
/// key, so `/santé/`, `/sant%C3%A9/`, `users:export` and `users%3Aexport` name the same
/// object and must match the same dataset: everything is decoded except what would change
/// how the path reads (`%`, `?`, `#`), space and control characters, which stay escaped.
/// (`/`, `\\` and NUL are refused before this is asked.)
fn decodes(b: u8) -> bool {
    b >= 0x80 || (b > 0x20 && b < 0x7F && !matches!(b, b'%' | b'?' | b'#'))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises the path part of a request target (no query): decodes percent-escapes (all but
/// those [`decodes`] keeps, which are upper-cased), resolves `.` and `..`, collapses `//`.
/// Borrows the input when it is already normal.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, Ambiguity> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(Ambiguity::NotAbsolute);
    }
    if is_plain(b) {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded_segments = decode_segments(raw)?;
    let mut out: Vec<&str> = Vec::new();
    // Every escape left must decode, together with its neighbours, to valid UTF-8.
    for seg in &decoded_segments {
        if seg.contains('%') {
            percent_decode(seg).ok_or(Ambiguity::InvalidUtf8)?;
        }
    }
    let last = decoded_segments.len() - 1;
    let mut trailing_slash = false;
    for (i, seg) in decoded_segments.iter().enumerate() {
        match seg.as_str() {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(Ambiguity::AboveRoot);
                }
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut n = String::with_capacity(raw.len());
    for s in &out {
        n.push('/');
        n.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        n.push('/');
    }
    if n == raw {
        Ok(Cow::Borrowed(raw))
    } else {
        Ok(Cow::Owned(n))
    }
}

/// Splits a path into segments (after the leading `/`) with escapes decoded as [`decodes`]
/// says and the others upper-cased, refusing what is ambiguous in any single segment.
fn decode_segments(raw: &str) -> Result<Vec<String>, Ambiguity> {
    let mut decoded_segments: Vec<String> = Vec::new();
    for seg in raw[1..].split('/') {
        let sb = seg.as_bytes();
        let mut s = Vec::with_capacity(sb.len());
        let mut had_escape = false;
        let mut i = 0;
        while i < sb.len() {
            match sb[i] {
                0 => return Err(Ambiguity::Nul),
                b'\\' => return Err(Ambiguity::Backslash),
                b'%' => {
                    let (h, l) = match (
                        sb.get(i + 1).copied().and_then(hex),
                        sb.get(i + 2).copied().and_then(hex),
                    ) {
                        (Some(h), Some(l)) => (h, l),
                        _ => return Err(Ambiguity::BadPercent),
                    };
                    let v = h * 16 + l;
                    match v {
                        b'/' => return Err(Ambiguity::EncodedSlash),
                        b'\\' => return Err(Ambiguity::Backslash),
                        0 => return Err(Ambiguity::Nul),
                        _ => {}
                    }
                    had_escape = true;
                    if decodes(v) {
                        s.push(v);
                    } else {
                        s.push(b'%');
                        s.push(sb[i + 1].to_ascii_uppercase());
                        s.push(sb[i + 2].to_ascii_uppercase());
                    }
                    i += 3;
                }
                c => {
                    s.push(c);
                    i += 1;
                }
            }
        }
        if had_escape && (s == b"." || s == b"..") {
            return Err(Ambiguity::EncodedDotSegment);
        }
        decoded_segments.push(String::from_utf8(s).map_err(|_| Ambiguity::InvalidUtf8)?);
    }
    Ok(decoded_segments)
}

/// The path read literally, as a server that does not resolve `.`, `..` or `//` would read
/// it: escapes decoded like `normalize` does, nothing else. Callers compare the decision
/// under this reading with the decision under the normalised one.
pub fn literal(raw: &str) -> Result<Cow<'_, str>, Ambiguity> {
    if !raw.as_bytes().contains(&b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    let segs = decode_segments(raw)?;
    let mut n = String::with_capacity(raw.len());
    for s in &segs {
        n.push('/');
        n.push_str(s);
    }
    Ok(Cow::Owned(n))
}

/// Fully percent-decodes a normalised segment (used for subject identifiers); `None` when the
/// result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The `n`-th (1-based) segment of a normalised path.
pub fn segment(path: &str, n: usize) -> Option<&str> {
    path.split('/')
        .skip(1)
        .nth(n.checked_sub(1)?)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalize("/payments/u1/2026.json"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize("/"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn dots_and_double_slashes_resolve() {
        assert_eq!(ok("/public/../payments/u1"), "/payments/u1");
        assert_eq!(ok("//payments//u1/"), "/payments/u1/");
        assert_eq!(ok("/a/./b/."), "/a/b/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b.json"), "/a/b.json");
        assert_eq!(ok("/a/..b/c"), "/a/..b/c");
    }

    #[test]
    fn escapes_decode_to_the_spelling_a_store_reads_and_delimiters_stay_uppercased() {
        assert_eq!(ok("/p%61yments/u1"), "/payments/u1");
        assert_eq!(ok("/a/%7euser/x%2ejson"), "/a/~user/x.json");
        // One spelling per object: escaped and raw name the same key to a store.
        assert_eq!(ok("/a/b%3ac"), "/a/b:c");
        assert_eq!(ok("/sant%c3%a9/u1"), "/santé/u1");
        assert_eq!(ok("/sant%C3%A9/u1"), ok("/santé/u1"));
        assert_eq!(ok("/a/b%20c%25d%3fe%23f%7f"), "/a/b%20c%25d%3Fe%23f%7F");
        assert_eq!(normalize("/a/%c3"), Err(Ambiguity::InvalidUtf8));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(
            normalize("/public/..%2fpayments/u1"),
            Err(Ambiguity::EncodedSlash)
        );
        assert_eq!(
            normalize("/public/%2e%2e/payments"),
            Err(Ambiguity::EncodedDotSegment)
        );
        assert_eq!(
            normalize("/public/.%2E/payments"),
            Err(Ambiguity::EncodedDotSegment)
        );
        assert_eq!(
            normalize("/public/%2e/payments"),
            Err(Ambiguity::EncodedDotSegment)
        );
        assert_eq!(normalize("/a\\b"), Err(Ambiguity::Backslash));
        assert_eq!(normalize("/a%5cb"), Err(Ambiguity::Backslash));
        assert_eq!(normalize("/a%00"), Err(Ambiguity::Nul));
        assert_eq!(normalize("/a%c3%28"), Err(Ambiguity::InvalidUtf8));
        assert_eq!(normalize("/a%zz"), Err(Ambiguity::BadPercent));
        assert_eq!(normalize("/a%4"), Err(Ambiguity::BadPercent));
        assert_eq!(normalize("/../etc"), Err(Ambiguity::AboveRoot));
        assert_eq!(normalize("payments"), Err(Ambiguity::NotAbsolute));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in ["/a//b/../c/%7e%41", "/x/./y/", "/%C3%A9/..", "//"] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
        }
    }

    #[test]
    fn segments_and_decoding() {
        assert_eq!(segment("/payments/u123/2026.json", 2), Some("u123"));
        assert_eq!(segment("/payments/", 2), None);
        assert_eq!(segment("/payments", 0), None);
        assert_eq!(
            percent_decode("alice%40example.com").unwrap(),
            "alice@example.com"
        );
        assert!(percent_decode("%FF").is_none());
    }
}
