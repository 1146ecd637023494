//! What a records dataset declares: the object's format, where each record names its
//! subject, and how the object is compressed on the wire.

use std::fmt;

/// The layout of a bulk object's records.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// One JSON value per line.
    Jsonl,
    /// RFC 4180 comma-separated values with a header row.
    Csv,
    /// Apache Parquet, filtered one row group at a time.
    Parquet,
}

impl Format {
    /// The format named in a policy (`"jsonl"`, `"csv"`, `"parquet"`).
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    /// The policy's name for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One step of a JSON pointer: an object key, which is also an array index when it is a
/// canonical decimal number (RFC 6901: no sign, no leading zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointerToken {
    pub key: Box<str>,
    pub index: Option<usize>,
}

impl PointerToken {
    fn new(key: String) -> PointerToken {
        let b = key.as_bytes();
        let canonical =
            !b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b[0] != b'0');
        let index = if canonical { key.parse().ok() } else { None };
        PointerToken {
            key: key.into_boxed_str(),
            index,
        }
    }
}

/// Where a record names its subject, parsed from the policy's `subject` string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectPath {
    /// JSON lines: the steps of a JSON pointer (a top-level key is a one-step pointer).
    Pointer(Box<[PointerToken]>),
    /// CSV: the column's name in the header row.
    Column(Box<str>),
    /// Parquet: the steps of a column path (`user.id` is field `id` of struct `user`).
    ColumnPath(Box<[Box<str>]>),
}

/// A `subject` string that cannot locate a subject in records of its format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectPathError {
    #[error("records.subject is empty; name a JSON pointer, a column or a column path")]
    Empty,
    #[error(
        "records.subject \"{text}\" has \"~\" not followed by 0 or 1; a JSON pointer escapes \"~\" as ~0 and \"/\" as ~1"
    )]
    BadEscape { text: String },
    #[error(
        "records.subject \"{text}\" has an empty step; a Parquet column path is names joined by \".\", such as user.id"
    )]
    EmptyStep { text: String },
}

impl SubjectPath {
    /// Parses the policy's `subject` string for records of `format`.
    ///
    /// JSON lines take a JSON pointer (`/user/id`, RFC 6901 escapes `~0` and `~1`) or, without a
    /// leading `/`, a top-level key taken literally. CSV takes a column name. Parquet takes a
    /// dotted column path.
    pub fn parse(format: Format, text: &str) -> Result<SubjectPath, SubjectPathError> {
        if text.is_empty() {
            return Err(SubjectPathError::Empty);
        }
        match format {
            Format::Jsonl => {
                let Some(pointer) = text.strip_prefix('/') else {
                    return Ok(SubjectPath::Pointer(Box::new([PointerToken::new(
                        text.to_owned(),
                    )])));
                };
                let mut tokens = Vec::new();
                for raw in pointer.split('/') {
                    let mut key = String::with_capacity(raw.len());
                    let mut chars = raw.chars();
                    while let Some(c) = chars.next() {
                        if c != '~' {
                            key.push(c);
                            continue;
                        }
                        match chars.next() {
                            Some('0') => key.push('~'),
                            Some('1') => key.push('/'),
                            _ => {
                                return Err(SubjectPathError::BadEscape { text: text.into() });
                            }
                        }
                    }
                    tokens.push(PointerToken::new(key));
                }
                Ok(SubjectPath::Pointer(tokens.into_boxed_slice()))
            }
            Format::Csv => Ok(SubjectPath::Column(text.into())),
            Format::Parquet => {
                let steps: Vec<Box<str>> = text.split('.').map(Box::from).collect();
                if steps.iter().any(|s| s.is_empty()) {
                    return Err(SubjectPathError::EmptyStep { text: text.into() });
                }
                Ok(SubjectPath::ColumnPath(steps.into_boxed_slice()))
            }
        }
    }
}

/// A dataset's `records = { format, subject }`, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordsSpec {
    pub format: Format,
    pub subject: SubjectPath,
    /// The `subject` string as the policy wrote it, for messages.
    pub subject_text: Box<str>,
}

impl RecordsSpec {
    /// Compiles `records = { format, subject }`.
    pub fn new(format: Format, subject: &str) -> Result<RecordsSpec, SubjectPathError> {
        Ok(RecordsSpec {
            format,
            subject: SubjectPath::parse(format, subject)?,
            subject_text: subject.into(),
        })
    }
}

/// How the object's bytes are compressed on the wire; the filtered output is compressed the
/// same way.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    Identity,
    /// gzip (RFC 1952), one member or several concatenated.
    Gzip,
    /// Zstandard frames (RFC 8878).
    Zstd,
}

/// A compression the filter cannot undo, so the object's records cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the object's Content-Encoding \"{0}\" cannot be filtered; only gzip and zstd (or none) can"
)]
pub struct UnsupportedEncoding(pub String);

impl Compression {
    /// The compression of an object from its `Content-Encoding` header and its key (the
    /// request path without the query). A `Content-Encoding` other than `identity` decides;
    /// without one, a key ending `.gz` or `.zst` does. Anything else, including a list of
    /// several encodings, is refused: its records could not be read.
    pub fn detect(
        content_encoding: Option<&str>,
        key: &str,
    ) -> Result<Compression, UnsupportedEncoding> {
        let encoding = content_encoding.map(str::trim).unwrap_or("");
        if encoding.eq_ignore_ascii_case("gzip") || encoding.eq_ignore_ascii_case("x-gzip") {
            return Ok(Compression::Gzip);
        }
        if encoding.eq_ignore_ascii_case("zstd") {
            return Ok(Compression::Zstd);
        }
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            return Err(UnsupportedEncoding(encoding.to_owned()));
        }
        let key = key.as_bytes();
        let ends_with = |suffix: &[u8]| {
            key.len() >= suffix.len()
                && key[key.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        };
        Ok(if ends_with(b".gz") {
            Compression::Gzip
        } else if ends_with(b".zst") {
            Compression::Zstd
        } else {
            Compression::Identity
        })
    }

    /// The `Content-Encoding` token, or `None` for identity.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Compression::Identity => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(path: &SubjectPath) -> Vec<(&str, Option<usize>)> {
        match path {
            SubjectPath::Pointer(t) => t.iter().map(|t| (&*t.key, t.index)).collect(),
            _ => panic!("not a pointer"),
        }
    }

    #[test]
    fn json_pointer_unescapes_and_finds_indices() {
        let p = SubjectPath::parse(Format::Jsonl, "/a~1b/m~0n/0/01/12/-").unwrap();
        assert_eq!(
            keys(&p),
            [
                ("a/b", None),
                ("m~n", None),
                ("0", Some(0)),
                ("01", None),
                ("12", Some(12)),
                ("-", None)
            ]
        );
        // Without a leading slash, a top-level key taken literally (no unescaping).
        let p = SubjectPath::parse(Format::Jsonl, "user~1id").unwrap();
        assert_eq!(keys(&p), [("user~1id", None)]);
        // "/" is the empty key.
        assert_eq!(
            keys(&SubjectPath::parse(Format::Jsonl, "/").unwrap()),
            [("", None)]
        );
    }

    #[test]
    fn bad_subject_strings_are_refused_with_the_value() {
        let e = SubjectPath::parse(Format::Jsonl, "/user/~2").unwrap_err();
        assert!(e.to_string().contains("\"/user/~2\""), "{e}");
        assert!(SubjectPath::parse(Format::Jsonl, "/a~").is_err());
        assert_eq!(
            SubjectPath::parse(Format::Csv, ""),
            Err(SubjectPathError::Empty)
        );
        let e = SubjectPath::parse(Format::Parquet, "user..id").unwrap_err();
        assert!(e.to_string().contains("user..id"), "{e}");
        assert_eq!(
            SubjectPath::parse(Format::Parquet, "user.id").unwrap(),
            SubjectPath::ColumnPath(vec!["user".into(), "id".into()].into())
        );
    }

    #[test]
    fn compression_from_header_then_key() {
        use Compression::*;
        assert_eq!(Compression::detect(None, "/e/a.jsonl"), Ok(Identity));
        assert_eq!(Compression::detect(None, "/e/a.jsonl.gz"), Ok(Gzip));
        assert_eq!(Compression::detect(None, "/e/a.CSV.ZST"), Ok(Zstd));
        assert_eq!(Compression::detect(Some("gzip"), "/e/a.jsonl"), Ok(Gzip));
        assert_eq!(Compression::detect(Some(" ZSTD "), "/e/a.gz"), Ok(Zstd));
        assert_eq!(Compression::detect(Some("identity"), "/e/a.gz"), Ok(Gzip));
        let e = Compression::detect(Some("br"), "/e/a.jsonl").unwrap_err();
        assert!(e.to_string().contains("\"br\""), "{e}");
        assert!(Compression::detect(Some("gzip, zstd"), "/e/a").is_err());
    }
}
