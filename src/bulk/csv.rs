//! RFC 4180 rows: where a row ends (quote parity, so a newline inside quotes stays in the
//! row), and a strict parse of one row into its field count and one field.

use super::batch::{Reason, Slot};
use memchr::{memchr, memchr2};

/// Where a scan stopped inside a row, so that a row can be scanned as its bytes arrive.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct RowScan {
    state: State,
    /// The byte before the scan position is a comma, or the position starts the row.
    at_field_start: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    /// Not inside a quoted field.
    Out,
    /// Inside a quoted field.
    In,
    /// Just after a quote inside a quoted field: an escaped quote, or the field's end.
    QuoteSeen,
}

impl Default for RowScan {
    fn default() -> RowScan {
        RowScan {
            state: State::Out,
            at_field_start: true,
        }
    }
}

/// Finds the newline that ends the row being scanned, from `pos` on, as a lenient reader
/// (Python's `csv`, for one) splits rows: a quote opens a quoted field only at the start of
/// a field, so a newline inside one stays in the row, and a stray quote elsewhere is data.
/// A malformed row thus ends where such readers end it, and the rows after it are read in
/// step; the strict parse ([`parse_row`]) then drops the malformed row.
pub(crate) fn find_row_end(buf: &[u8], mut pos: usize, scan: &mut RowScan) -> Option<usize> {
    loop {
        match scan.state {
            State::Out => {
                let Some(i) = memchr2(b'"', b'\n', &buf[pos..]) else {
                    if pos < buf.len() {
                        scan.at_field_start = buf[buf.len() - 1] == b',';
                    }
                    return None;
                };
                let p = pos + i;
                if buf[p] == b'\n' {
                    *scan = RowScan::default();
                    return Some(p);
                }
                let field_start = if p == pos {
                    scan.at_field_start
                } else {
                    buf[p - 1] == b','
                };
                pos = p + 1;
                scan.at_field_start = false;
                if field_start {
                    scan.state = State::In;
                }
            }
            State::In => {
                pos += memchr(b'"', &buf[pos..])? + 1;
                scan.state = State::QuoteSeen;
            }
            State::QuoteSeen => {
                let &b = buf.get(pos)?;
                if b == b'"' {
                    pos += 1;
                    scan.state = State::In;
                } else {
                    scan.state = State::Out;
                    scan.at_field_start = false;
                }
            }
        }
    }
}

/// A field's place in its row: start, end, and whether it holds doubled quotes.
pub(crate) type FieldSpan = (usize, usize, bool);

/// Parses one row (its line terminator stripped) strictly: quoted fields may hold commas,
/// newlines and doubled quotes; a quote anywhere else, or anything after a closing quote
/// but a comma, is an error. Returns the number of fields and the span of field `want`
/// (start, end, whether it holds doubled quotes).
pub(crate) fn parse_row(row: &[u8], want: usize) -> Result<(usize, Option<FieldSpan>), ()> {
    // Most rows quote nothing: count the commas and take the field between two of them.
    if memchr(b'"', row).is_none() {
        let mut count = 0;
        let mut start = 0;
        let mut found = None;
        for comma in memchr::memchr_iter(b',', row) {
            if count == want {
                found = Some((start, comma, false));
            }
            count += 1;
            start = comma + 1;
        }
        if count == want {
            found = Some((start, row.len(), false));
        }
        return Ok((count + 1, found));
    }
    let n = row.len();
    let mut i = 0;
    let mut count = 0;
    let mut found = None;
    loop {
        let (start, end, escaped, next);
        if i < n && row[i] == b'"' {
            start = i + 1;
            let mut j = start;
            let mut esc = false;
            loop {
                j += memchr(b'"', &row[j..]).ok_or(())?;
                if row.get(j + 1) == Some(&b'"') {
                    esc = true;
                    j += 2;
                } else {
                    break;
                }
            }
            (end, escaped) = (j, esc);
            next = match row.get(j + 1) {
                None => None,
                Some(b',') => Some(j + 2),
                Some(_) => return Err(()),
            };
        } else {
            start = i;
            escaped = false;
            match memchr2(b',', b'"', &row[i..]) {
                None => {
                    end = n;
                    next = None;
                }
                Some(k) if row[i + k] == b'"' => return Err(()),
                Some(k) => {
                    end = i + k;
                    next = Some(end + 1);
                }
            }
        }
        if count == want {
            found = Some((start, end, escaped));
        }
        count += 1;
        match next {
            Some(k) => i = k,
            None => return Ok((count, found)),
        }
    }
}

/// The text of a field span of `row`, unescaping doubled quotes into `arena` when needed.
pub(crate) fn field_slot(row: &[u8], (start, end, escaped): FieldSpan, arena: &mut String) -> Slot {
    let raw = &row[start..end];
    if raw.is_empty() {
        return Slot::Missing(Reason::NO_SUBJECT);
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Slot::Missing(Reason::UNPARSABLE);
    };
    if !escaped {
        return Slot::Line(start as u32, raw.len() as u32);
    }
    let mark = arena.len();
    arena.push_str(&text.replace("\"\"", "\""));
    Slot::Arena(mark as u32, (arena.len() - mark) as u32)
}

/// The unescaped text of every field of a header row.
pub(crate) fn header_names(row: &[u8]) -> Result<Vec<Vec<u8>>, ()> {
    let mut names = Vec::new();
    let mut i = 0;
    loop {
        let (count, field) = parse_row(row, i)?;
        if let Some((s, e, escaped)) = field {
            let raw = &row[s..e];
            names.push(if escaped {
                let mut v = Vec::with_capacity(raw.len());
                let mut k = 0;
                while k < raw.len() {
                    v.push(raw[k]);
                    k += if raw[k] == b'"' { 2 } else { 1 };
                }
                v
            } else {
                raw.to_vec()
            });
        }
        i += 1;
        if i >= count {
            return Ok(names);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(row: &str) -> Result<Vec<String>, ()> {
        let (count, _) = parse_row(row.as_bytes(), usize::MAX)?;
        (0..count)
            .map(|i| {
                let (_, f) = parse_row(row.as_bytes(), i)?;
                let mut arena = String::new();
                Ok(match field_slot(row.as_bytes(), f.unwrap(), &mut arena) {
                    Slot::Line(s, l) => row[s as usize..(s + l) as usize].to_owned(),
                    Slot::Arena(s, l) => arena[s as usize..(s + l) as usize].to_owned(),
                    Slot::Missing(_) => String::new(),
                })
            })
            .collect()
    }

    #[test]
    fn rfc4180_fields() {
        assert_eq!(fields("a,b,c").unwrap(), ["a", "b", "c"]);
        assert_eq!(fields("a,,").unwrap(), ["a", "", ""]);
        assert_eq!(fields("").unwrap(), [""]);
        assert_eq!(
            fields(r#""a,b","say ""hi""",c"#).unwrap(),
            ["a,b", r#"say "hi""#, "c"]
        );
        assert_eq!(fields("\"multi\nline\",x").unwrap(), ["multi\nline", "x"]);
        assert_eq!(fields(r#""""#).unwrap(), [""]);
        assert_eq!(fields(r#""""""#).unwrap(), ["\""]);
        assert_eq!(fields(" a , b ").unwrap(), [" a ", " b "]);
    }

    #[test]
    fn quote_errors() {
        for row in [
            r#"a"b,c"#,
            r#""ab"c,d"#,
            r#""ab"#,
            r#"a,"b"#,
            r#""a" ,b"#,
            r#"x,y""#,
        ] {
            assert_eq!(parse_row(row.as_bytes(), 0), Err(()), "{row}");
        }
    }

    /// Row ends found scanning `buf` in one go and in pieces of every size.
    fn row_ends(buf: &[u8]) -> Vec<usize> {
        let mut whole = Vec::new();
        let (mut from, mut scan) = (0, RowScan::default());
        while let Some(nl) = find_row_end(buf, from, &mut scan) {
            whole.push(nl);
            from = nl + 1;
        }
        for step in 1..buf.len() {
            let mut ends = Vec::new();
            let (mut from, mut scan, mut len) = (0, RowScan::default(), 0);
            while len < buf.len() {
                len = (len + step).min(buf.len());
                while let Some(nl) = find_row_end(&buf[..len], from, &mut scan) {
                    ends.push(nl);
                    from = nl + 1;
                }
                from = from.max(len);
            }
            assert_eq!(ends, whole, "in pieces of {step}");
        }
        whole
    }

    #[test]
    fn row_ends_respect_quoted_newlines_across_calls() {
        assert_eq!(row_ends(b"a,\"x\ny\"\"\nz\",b\nnext\n"), [13, 18]);
        assert_eq!(row_ends(b"\"a\nb\"\r\n\"\"\n"), [6, 9]);
        // A stray quote inside an unquoted field is data: the row ends at its newline.
        assert_eq!(row_ends(b"5\" screen,x\nb,\"q\nq\"\n"), [11, 19]);
        // Text after a closing quote continues the field.
        assert_eq!(row_ends(b"\"ab\"c,\"m\nl\"\nz\n"), [11, 13]);
        // Quoted to the end: no row end.
        assert_eq!(row_ends(b"a,\"open\nstill"), Vec::<usize>::new());
    }

    #[test]
    fn header_names_unescape() {
        assert_eq!(
            header_names(br#"id,"na,me","q""t""#).unwrap(),
            [b"id".to_vec(), b"na,me".to_vec(), b"q\"t".to_vec()]
        );
        assert!(header_names(br#"id,na"me"#).is_err());
    }
}
