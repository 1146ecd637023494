//! One JSON-lines record: validates the whole line in one pass and finds the subject at a
//! JSON pointer, walking only the pointer's path and skipping every other value unbuilt.

use super::batch::{Reason, Slot};
use super::spec::PointerToken;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// The subject of the JSON record `line` (its terminator stripped) at `path`. Borrowed
/// subjects are given as offsets into `line`; unescaped strings and integers are written to
/// `arena`.
pub(crate) fn subject(line: &[u8], path: &[PointerToken], arena: &mut String) -> Slot {
    // serde_json validates UTF-8 only in the strings it hands out; the whole line must be.
    let Ok(text) = std::str::from_utf8(line) else {
        return Slot::Missing(Reason::UNPARSABLE);
    };
    let arena_mark = arena.len();
    let mut de = serde_json::Deserializer::from_str(text);
    let found = Walk { path, arena }
        .deserialize(&mut de)
        .and_then(|f| de.end().map(|()| f));
    match found {
        Ok(Found::Borrowed(s)) => {
            let off = s.as_ptr() as usize - text.as_ptr() as usize;
            Slot::Line(off as u32, s.len() as u32)
        }
        Ok(Found::Arena) => Slot::Arena(arena_mark as u32, (arena.len() - arena_mark) as u32),
        Ok(Found::Absent | Found::NotText) => {
            arena.truncate(arena_mark);
            Slot::Missing(Reason::NO_SUBJECT)
        }
        Ok(Found::Ambiguous) | Err(_) => {
            arena.truncate(arena_mark);
            Slot::Missing(Reason::UNPARSABLE)
        }
    }
}

/// What the walk found at the pointer.
enum Found<'de> {
    Absent,
    /// A string without escapes, borrowed from the line.
    Borrowed(&'de str),
    /// A string with escapes, or an integer's digits, appended to the arena.
    Arena,
    /// Null, a boolean, a float, an object, an array or an empty string.
    NotText,
    /// A key on the path appears twice in one object: readers disagree on which counts.
    Ambiguous,
}

/// Walks one value: descends along `path` while it is not empty, captures the value where
/// it is, and consumes (validating) everything else.
struct Walk<'p, 'a> {
    path: &'p [PointerToken],
    arena: &'a mut String,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = Found<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    type Value = Found<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Found<'de>, E> {
        Ok(match self.path.is_empty() {
            true if !v.is_empty() => Found::Borrowed(v),
            true => Found::NotText,
            false => Found::Absent,
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Found<'de>, E> {
        Ok(match self.path.is_empty() {
            true if !v.is_empty() => {
                self.arena.push_str(v);
                Found::Arena
            }
            true => Found::NotText,
            false => Found::Absent,
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Found<'de>, E> {
        if !self.path.is_empty() {
            return Ok(Found::Absent);
        }
        use std::fmt::Write;
        let _ = write!(self.arena, "{v}");
        Ok(Found::Arena)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Found<'de>, E> {
        if !self.path.is_empty() {
            return Ok(Found::Absent);
        }
        use std::fmt::Write;
        let _ = write!(self.arena, "{v}");
        Ok(Found::Arena)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found<'de>, E> {
        Ok(self.scalar())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found<'de>, E> {
        Ok(self.scalar())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Found<'de>, E> {
        Ok(self.scalar())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found<'de>, A::Error> {
        let Some((token, rest)) = self.path.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Found::NotText);
        };
        let mut found: Option<Found<'de>> = None;
        while let Some(hit) = map.next_key_seed(KeyIs(&token.key))? {
            if !hit {
                map.next_value::<IgnoredAny>()?;
            } else if found.is_some() {
                map.next_value::<IgnoredAny>()?;
                found = Some(Found::Ambiguous);
            } else {
                found = Some(map.next_value_seed(Walk {
                    path: rest,
                    arena: &mut *self.arena,
                })?);
            }
        }
        Ok(found.unwrap_or(Found::Absent))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found<'de>, A::Error> {
        let target = self.path.first().and_then(|t| t.index);
        let mut found = Found::Absent;
        let mut i = 0usize;
        loop {
            if Some(i) == target {
                let walk = Walk {
                    path: &self.path[1..],
                    arena: &mut *self.arena,
                };
                match seq.next_element_seed(walk)? {
                    Some(f) => found = f,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(if self.path.is_empty() {
            Found::NotText
        } else {
            found
        })
    }
}

impl<'de> Walk<'_, '_> {
    fn scalar(&self) -> Found<'de> {
        if self.path.is_empty() {
            Found::NotText
        } else {
            Found::Absent
        }
    }
}

/// Whether an object key equals the pointer's token, without allocating for plain keys.
struct KeyIs<'t>(&'t str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// Whether a line holds only JSON whitespace (and so is not a record).
pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::spec::{Format, SubjectPath};

    fn subj(line: &str, pointer: &str) -> Result<String, Reason> {
        let SubjectPath::Pointer(path) = SubjectPath::parse(Format::Jsonl, pointer).unwrap() else {
            unreachable!()
        };
        let mut arena = String::from("x");
        match subject(line.as_bytes(), &path, &mut arena) {
            Slot::Line(off, len) => Ok(line[off as usize..(off + len) as usize].to_owned()),
            Slot::Arena(off, len) => Ok(arena[off as usize..(off + len) as usize].to_owned()),
            Slot::Missing(r) => {
                assert_eq!(arena, "x", "a missing subject leaves the arena as it was");
                Err(r)
            }
        }
    }

    #[test]
    fn pointer_finds_strings_integers_nested_and_escaped_keys() {
        let line = r#"{"a":[1,{"x":2}],"user":{"id":"u1","n":[{"k":"v"}]},"a/b":{"m~n":"esc"},"n":-42,"big":18446744073709551615}"#;
        assert_eq!(subj(line, "/user/id").as_deref(), Ok("u1"));
        assert_eq!(subj(line, "/user/n/0/k").as_deref(), Ok("v"));
        assert_eq!(subj(line, "/a~1b/m~0n").as_deref(), Ok("esc"));
        assert_eq!(subj(line, "/n").as_deref(), Ok("-42"));
        assert_eq!(subj(line, "n").as_deref(), Ok("-42"));
        assert_eq!(subj(line, "/big").as_deref(), Ok("18446744073709551615"));
        assert_eq!(subj(line, "/a/1/x").as_deref(), Ok("2"));
        // Escaped string subjects are unescaped.
        assert_eq!(subj(r#"{"id":"a\"b\u00e9"}"#, "id").as_deref(), Ok("a\"bé"));
        // Escaped keys match too.
        assert_eq!(subj(r#"{"\u0069d":"k"}"#, "id").as_deref(), Ok("k"));
        // A top-level array.
        assert_eq!(subj(r#"["a","b"]"#, "/1").as_deref(), Ok("b"));
    }

    #[test]
    fn what_is_not_a_subject() {
        for line in [
            r#"{"id":null}"#,
            r#"{"id":true}"#,
            r#"{"id":1.5}"#,
            r#"{"id":1e3}"#,
            r#"{"id":""}"#,
            r#"{"id":{"x":"y"}}"#,
            r#"{"id":["y"]}"#,
            r#"{"other":"y"}"#,
            r#"["id"]"#,
            r#""id""#,
            r#"{"id":123456789012345678901234567890}"#,
        ] {
            assert_eq!(subj(line, "/id"), Err(Reason::NO_SUBJECT), "{line}");
        }
        // "-" and a non-canonical index never match an element.
        assert_eq!(subj(r#"{"a":["x"]}"#, "/a/-"), Err(Reason::NO_SUBJECT));
        assert_eq!(subj(r#"{"a":["x"]}"#, "/a/00"), Err(Reason::NO_SUBJECT));
        assert_eq!(subj(r#"{"a":["x"]}"#, "/a/1"), Err(Reason::NO_SUBJECT));
    }

    #[test]
    fn the_whole_line_must_be_valid_json() {
        for line in [
            r#"{"id":"u1""#,
            r#"{"id":"u1"} x"#,
            r#"{"id":"u1"}{"id":"u2"}"#,
            r#"{"id":"u1","x":[1,2}"#,
            r#"{"id":"u1","x":tru}"#,
            r#"{"id":"u1","x":"bad \q escape"}"#,
            r#"{"id":"u1",}"#,
            "{\"id\":\"u1\",\"x\":\"ctl \u{1}\"}",
            "",
        ] {
            assert_eq!(subj(line, "/id"), Err(Reason::UNPARSABLE), "{line}");
        }
        // Invalid UTF-8 in a value the walk skips.
        let mut arena = String::new();
        let path = [PointerToken {
            key: "id".into(),
            index: None,
        }];
        assert!(matches!(
            subject(b"{\"id\":\"u1\",\"x\":\"\xff\"}", &path, &mut arena),
            Slot::Missing(Reason::UNPARSABLE)
        ));
        // Surrounding whitespace is fine.
        assert_eq!(subj(" {\"id\":\"u1\"} \r", "/id").as_deref(), Ok("u1"));
    }

    #[test]
    fn a_duplicated_key_on_the_path_is_ambiguous() {
        assert_eq!(
            subj(r#"{"id":"a","id":"b"}"#, "/id"),
            Err(Reason::UNPARSABLE)
        );
        assert_eq!(
            subj(r#"{"u":{"id":"a"},"u":{"id":"b"}}"#, "/u/id"),
            Err(Reason::UNPARSABLE)
        );
        // Duplicates off the path do not matter.
        assert_eq!(subj(r#"{"x":1,"x":2,"id":"a"}"#, "/id").as_deref(), Ok("a"));
    }

    #[test]
    fn deep_nesting_is_validated_without_overflowing() {
        // Skipped values are walked without recursion: valid however deep.
        let deep = format!(
            "{{\"id\":\"a\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(subj(&deep, "/id").as_deref(), Ok("a"));
        let unbalanced = format!(
            "{{\"id\":\"a\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(99_999)
        );
        assert_eq!(subj(&unbalanced, "/id"), Err(Reason::UNPARSABLE));
        // On the pointer's path, serde_json's depth limit fails closed.
        let path = "/a".repeat(200);
        let nested = format!("{}\"v\"{}", "{\"a\":".repeat(200), "}".repeat(200));
        assert_eq!(subj(&nested, &path), Err(Reason::UNPARSABLE));
        let path = "/a".repeat(20);
        let nested = format!("{}\"v\"{}", "{\"a\":".repeat(20), "}".repeat(20));
        assert_eq!(subj(&nested, &path).as_deref(), Ok("v"));
    }
}
