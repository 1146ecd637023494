//! Offline verification of a decision log: chain, sequence numbers, and (later) signed
//! checkpoints; names the first broken record by file and line.
//!
//! Each line is read as untyped JSON, so that a record the verifier's own version does not
//! know still verifies, and hashed again over a canonical form built here: object keys
//! sorted, no whitespace. That is the form the writer emits, since record fields are
//! declared in sorted order; the line itself must be exactly that form with `hash` last, so
//! that a value spelled another way (`0e0` for `0.0`) does not pass as the same record.

use super::chain::{GENESIS, link};
use serde_json::Value;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

/// A log that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Decision and outcome records (every line that is not a checkpoint).
    pub records: u64,
    pub checkpoints: u64,
}

/// The first place where a log is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {why}", file.display())]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based; 0 when the file could not be read at all.
    pub line: usize,
    pub why: String,
}

/// Why a log did not verify: it could not be read, or it is broken.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read decision log {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Broken(#[from] Broken),
}

/// Verifies the log at `path` (a file, or a folder of rotated files). A log that cannot be
/// read is reported as broken at line 0; [`verify_log`] tells the two apart.
pub fn verify(path: &Path) -> Result<VerifyReport, Broken> {
    verify_log(path).map_err(|e| match e {
        VerifyError::Broken(b) => b,
        VerifyError::Read { path, source } => Broken {
            file: path,
            line: 0,
            why: format!("cannot read: {source}"),
        },
    })
}

/// Verifies the log at `path`: a file, or a folder whose `*.jsonl` files are one chain in
/// file-name order.
pub fn verify_log(path: &Path) -> Result<VerifyReport, VerifyError> {
    let mut chain = Chain {
        seq: 0,
        hash: GENESIS.to_string(),
        canonical: Vec::new(),
        report: VerifyReport {
            records: 0,
            checkpoints: 0,
        },
    };
    for file in log_files(path)? {
        chain.file(&file)?;
    }
    Ok(chain.report)
}

fn unreadable(path: &Path) -> impl FnOnce(io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Read {
        path: path.into(),
        source,
    }
}

fn log_files(path: &Path) -> Result<Vec<PathBuf>, VerifyError> {
    let meta = std::fs::metadata(path).map_err(unreadable(path))?;
    if !meta.is_dir() {
        return Ok(vec![path.into()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(unreadable(path))? {
        let entry = entry.map_err(unreadable(path))?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "jsonl") && !p.is_dir() {
            files.push(p);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The chain as verified so far.
struct Chain {
    /// `seq` of the last good record; 0 before the first.
    seq: u64,
    /// `hash` of the last good record; genesis before the first.
    hash: String,
    /// Reused for each record's canonical bytes.
    canonical: Vec<u8>,
    report: VerifyReport,
}

impl Chain {
    fn file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let file = File::open(path).map_err(unreadable(path))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            if reader
                .read_until(b'\n', &mut line)
                .map_err(unreadable(path))?
                == 0
            {
                return Ok(());
            }
            number += 1;
            let checked = match line.pop() {
                Some(b'\n') => self.record(&line),
                _ => Err(
                    "incomplete record: the log ends mid-line (cut short, or still being written)"
                        .into(),
                ),
            };
            checked.map_err(|why| Broken {
                file: path.into(),
                line: number,
                why,
            })?;
        }
    }

    /// Checks one line against the chain so far and, if it holds, moves the chain on.
    fn record(&mut self, line: &[u8]) -> Result<(), String> {
        let mut value: Value =
            serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(fields) = &mut value else {
            return Err("not a JSON object".into());
        };
        let seq = match fields.get("seq") {
            None => return Err("missing field seq".into()),
            Some(s) => s
                .as_u64()
                .ok_or("field seq is not a non-negative integer")?,
        };
        let hash = match fields.remove("hash") {
            None => return Err("missing field hash".into()),
            Some(Value::String(h)) => h,
            Some(_) => return Err("field hash is not a string".into()),
        };
        let prev = match fields.get("prev") {
            None => return Err("missing field prev".into()),
            Some(Value::String(p)) => p,
            Some(_) => return Err("field prev is not a string".into()),
        };
        let checkpoint = fields.get("kind").and_then(Value::as_str) == Some("checkpoint");

        if seq != self.seq + 1 {
            return Err(if self.seq == 0 {
                format!("seq {seq} at the start of the log: records before it are missing")
            } else {
                format!(
                    "seq {seq} follows {}: a record was deleted or reordered",
                    self.seq
                )
            });
        }
        if *prev != self.hash {
            return Err(if self.seq == 0 {
                "prev of the first record is not the genesis hash".into()
            } else {
                "prev does not match the previous record's hash".into()
            });
        }
        self.canonical.clear();
        canonical_json(&value, &mut self.canonical);
        if link(&self.hash, &self.canonical) != hash {
            return Err("hash mismatch: record was edited".into());
        }
        // The hash covers the record's values, and JSON spells some values two ways (`0.0`
        // and `0e0`, `\u001f` and `\u001F`): only the bytes the writer emits are accepted,
        // so that no byte of a line can change unnoticed.
        if !is_written_form(line, &self.canonical, &hash) {
            return Err(
                "record is not in the form the writer emits (canonical JSON, hash last): it was edited"
                    .into(),
            );
        }

        self.seq = seq;
        self.hash = hash;
        if checkpoint {
            self.report.checkpoints += 1;
        } else {
            self.report.records += 1;
        }
        Ok(())
    }
}

/// Whether `line` is `canonical` with `"hash"` added as its last field, as the writer
/// writes it.
fn is_written_form(line: &[u8], canonical: &[u8], hash: &str) -> bool {
    const KEY: &[u8] = br#","hash":""#;
    let Some((b'}', body)) = canonical.split_last() else {
        return false;
    };
    line.len() == body.len() + KEY.len() + hash.len() + 2
        && line.starts_with(body)
        && line[body.len()..].starts_with(KEY)
        && line[body.len() + KEY.len()..].starts_with(hash.as_bytes())
        && line.ends_with(b"\"}")
}

/// Writes `value` in the canonical form the chain hashes: object keys sorted by their UTF-8
/// bytes at every depth, no whitespace, strings and numbers as serde_json writes them.
pub fn canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            serde_json::to_writer(&mut *out, n).expect("writing to a Vec cannot fail")
        }
        Value::String(s) => {
            serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail")
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(fields) => {
            // Sorted here rather than trusting the map's order, which a serde_json feature
            // (`preserve_order`) enabled anywhere in the build would change.
            let mut sorted: Vec<(&String, &Value)> = fields.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("writing to a Vec cannot fail");
                out.push(b':');
                canonical_json(item, out);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::tests::write_log;

    /// A real log of six records, written by the writer; returns its lines (with `\n`).
    fn written_log(dir: &Path) -> Vec<String> {
        let path = dir.join("source.jsonl");
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(write_log(&path, 0..6));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        text.split_inclusive('\n').map(str::to_string).collect()
    }

    fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, lines.concat()).unwrap();
        path
    }

    fn broken_at(path: &Path, line: usize, why: &str) {
        let b = verify(path).unwrap_err();
        assert_eq!((b.file.as_path(), b.line), (path, line), "{b}");
        assert!(b.why.contains(why), "expected {why:?}, got {b}");
    }

    #[test]
    fn an_untouched_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "d.jsonl", &written_log(dir.path()));
        assert_eq!(
            verify(&path).unwrap(),
            VerifyReport {
                records: 6,
                checkpoints: 0
            }
        );
    }

    #[test]
    fn an_empty_log_verifies_with_no_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "d.jsonl", &[]);
        assert_eq!(verify(&path).unwrap().records, 0);
        assert_eq!(verify(dir.path()).unwrap().records, 0);
    }

    #[test]
    fn an_edited_field_is_a_hash_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        lines[2] = lines[2].replace("\"method\":\"GET\"", "\"method\":\"PUT\"");
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 3, "hash mismatch: record was edited");
    }

    /// Found by `tests/properties.rs`: an outcome's `"duration_ms":0.0` changed to `0e0`
    /// parsed to the same value, hashed the same, and verified.
    #[test]
    fn a_value_respelled_with_the_same_meaning_is_an_edit() {
        let dir = tempfile::tempdir().unwrap();
        let respellings = [
            ("\"method\":\"GET\"", "\"method\":\"\\u0047ET\""),
            ("{\"category\"", "{ \"category\""),
            ("\"v\":1,\"hash\"", "\"v\":1 ,\"hash\""),
        ];
        for (i, (from, to)) in respellings.into_iter().enumerate() {
            let mut lines = written_log(dir.path());
            assert!(lines[2].contains(from), "{from} not in {}", lines[2]);
            lines[2] = lines[2].replacen(from, to, 1);
            let path = write(dir.path(), &format!("d{i}.jsonl"), &lines);
            broken_at(&path, 3, "not in the form the writer emits");
        }
    }

    #[test]
    fn a_deleted_line_breaks_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        lines.remove(3);
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(
            &path,
            4,
            "seq 5 follows 3: a record was deleted or reordered",
        );
        // The first record too: the log must start at the genesis.
        let mut lines = written_log(dir.path());
        lines.remove(0);
        let path = write(dir.path(), "first.jsonl", &lines);
        broken_at(&path, 1, "seq 2 at the start of the log");
    }

    #[test]
    fn swapped_lines_break_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        lines.swap(1, 2);
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 2, "seq 3 follows 1");
    }

    #[test]
    fn a_forged_record_with_its_own_valid_hash_is_caught_by_prev() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        // The forger rewrites record 4 and hashes it correctly, but cannot link it to the
        // real record 3 without rewriting every later record too.
        let mut forged: Value = serde_json::from_str(&lines[3]).unwrap();
        forged["decision"] = "allow".into();
        forged["prev"] = "ab".repeat(32).into();
        forged.as_object_mut().unwrap().remove("hash");
        let mut bytes = Vec::new();
        canonical_json(&forged, &mut bytes);
        forged["hash"] = link(&"ab".repeat(32), &bytes).into();
        lines[3] = format!("{forged}\n");
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 4, "prev does not match the previous record's hash");
    }

    #[test]
    fn garbage_at_the_end_is_not_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        lines.push("garbage\n".into());
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 7, "not JSON");
    }

    #[test]
    fn a_cut_file_names_the_damaged_line() {
        let dir = tempfile::tempdir().unwrap();
        let lines = written_log(dir.path());
        let whole = lines.concat();
        // Cut short in the middle of record 4.
        let cut = lines[..3].concat().len() + 10;
        let path = dir.path().join("short.jsonl");
        std::fs::write(&path, &whole[..cut]).unwrap();
        broken_at(&path, 4, "incomplete record");
        // The second half of record 2 taken out: what is left of it runs into record 3.
        let from = lines[0].len() + lines[1].len() / 2;
        let to = lines[..2].concat().len();
        let path = dir.path().join("hole.jsonl");
        std::fs::write(&path, format!("{}{}", &whole[..from], &whole[to..])).unwrap();
        broken_at(&path, 2, "not JSON");
    }

    #[test]
    fn a_missing_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        let mut v: Value = serde_json::from_str(&lines[1]).unwrap();
        v.as_object_mut().unwrap().remove("seq");
        lines[1] = format!("{v}\n");
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 2, "missing field seq");
    }

    #[test]
    fn a_folder_is_one_chain_in_file_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let lines = written_log(dir.path());
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        write(&logs, "decisions-0001.jsonl", &lines[..4]);
        write(&logs, "decisions.jsonl", &lines[4..]);
        write(&logs, "notes.txt", &["not a log\n".to_string()]);
        assert_eq!(verify(&logs).unwrap().records, 6);
        // The same files in the wrong order: the second one starts the chain too late.
        std::fs::rename(
            logs.join("decisions.jsonl"),
            logs.join("decisions-0000.jsonl"),
        )
        .unwrap();
        broken_at(
            &logs.join("decisions-0000.jsonl"),
            1,
            "seq 5 at the start of the log",
        );
    }

    #[test]
    fn an_unreadable_path_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        assert!(matches!(
            verify_log(&missing),
            Err(VerifyError::Read { .. })
        ));
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_depth() {
        let v: Value = serde_json::from_str(
            r#"{ "b": 1, "a": {"d": [1.5, {"z": null, "y": true}], "c": "é\n\"q\""}, "A": -2 }"#,
        )
        .unwrap();
        let mut out = Vec::new();
        canonical_json(&v, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"A":-2,"a":{"c":"é\n\"q\"","d":[1.5,{"y":true,"z":null}]},"b":1}"#
        );
    }
}
