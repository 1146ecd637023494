//! Offline verification of a decision log: the hash chain, sequence numbers, signed
//! checkpoints and what they cover, across rotated files; names the first broken record by
//! file and line. One file, though long: about 725 lines of code, one pass over a chain whose
//! checks depend on each other's state; the rest is its tamper tests.
//!
//! Each line is read as untyped JSON, so that a record the verifier's own version does not
//! know still verifies, and hashed again over a canonical form built here: object keys
//! sorted, no whitespace. That is the form the writer emits, since record fields are
//! declared in sorted order; the line itself must be exactly that form with `hash` last, so
//! that a value spelled another way (`0e0` for `0.0`) does not pass as the same record.
//!
//! Signatures: with trusted keys (`--key`), every checkpoint must be signed by one of them.
//! Without, each signature is checked against the public key its checkpoint carries (whose
//! fingerprint it names), which catches any edit of a signed checkpoint but not a forger who
//! re-signs the whole log with a key of their own: the report then lists the fingerprints
//! that signed, for the reader to compare with the one they expect. Nor may a signature
//! simply go: once a checkpoint is signed, every later one must be, or whoever edited the
//! records after it could rewrite the chain and drop the signatures they cannot make.
//!
//! Bulk disclosures: a `disclosure` record names the subjects whose records a batch of a bulk
//! object carried out, under the decision that forwarded the object filtered record by
//! record. It is chained and signed like any record; besides, it must name (`id`) a decision
//! record earlier in the same chain whose reason is `consent_filtered`, and come before that
//! exchange's outcome record, else it stands for no decision the log shows.
//!
//! Coverage: a checkpoint signs the chain head, which commits to every record before it, so
//! the whole log is covered when it ends in a checkpoint; it must end in a *final* one (a
//! clean close), else it is open or truncated. Every rotated file ends in a checkpoint.
//!
//! Apart from [`super::query`], which reads only the fields it needs and skips a line it
//! cannot parse: verification reads every byte of every line and stops at the first that
//! does not hold. About 700 of its lines are code, the rest its tests.

use crate::audit::chain::{GENESIS, link};
use crate::audit::checkpoint;
use crate::audit::files::{LineReader, LogFilesError, log_files, oversized_why, unreadable};
use crate::audit::keys;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// How to verify.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Trusted raw Ed25519 public keys; empty: check signatures against the keys the log
    /// carries.
    pub keys: Vec<Vec<u8>>,
    /// The log is still being written: a missing final checkpoint is not an error, and
    /// records after the last checkpoint are reported as unsigned.
    pub open: bool,
    /// Heads recorded outside the log (the writer's `decision log checkpoint` events): the
    /// chain must reach each, with that hash. Neither a signature nor the chain can show
    /// that a log was cut back to an earlier final checkpoint, or cut and then continued by
    /// a restart; a head kept elsewhere can.
    pub heads: Vec<KnownHead>,
    /// Every record must name this instance (`instance`): set when verifying the files an
    /// instance shipped, so that a record moved from another chain is caught.
    pub instance: Option<String>,
}

/// `seq` and `hash` of a record, as known from outside the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownHead {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for KnownHead {
    type Err = String;

    /// `SEQ:HASH`, the hash as 64 hex digits.
    fn from_str(s: &str) -> Result<KnownHead, String> {
        let bad = || format!("\"{s}\" is not SEQ:HASH (a sequence number and 64 hex digits)");
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        if hash.len() != GENESIS.len() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(KnownHead {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// A crash the log records, or a file that changed under the running writer: where its
/// recovery record is and what it found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryFound {
    pub file: PathBuf,
    pub line: usize,
    pub seq: u64,
    /// The last record written before the crash.
    pub last_seq: u64,
    pub torn_bytes: u64,
    /// Set when the running writer found its file changed: the last record it had written.
    /// Only ever below `last_seq` in a log that verified (the file held more than the
    /// writer wrote); above it, records were lost, which fails.
    pub expected_seq: Option<u64>,
}

/// A log that verified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every record that is not a checkpoint (decision, outcome, recovery).
    pub records: u64,
    pub checkpoints: u64,
    /// Files read, in chain order.
    pub files: usize,
    /// `seq` of the last record.
    pub last_seq: u64,
    /// Checkpoints whose signature verified.
    pub signed: u64,
    /// Checkpoints without a signature: all of them before the first signed one (a log
    /// written, at first or throughout, without a signing key).
    pub unsigned_checkpoints: u64,
    /// Fingerprints of the keys that signed, in order of first use.
    pub signers: Vec<String>,
    /// Signatures were checked against keys the caller trusts.
    pub trusted: bool,
    /// Records after the last checkpoint, not yet signed (only with `open`).
    pub unsigned_tail: u64,
    /// `seq` of the last checkpoint.
    pub last_checkpoint: Option<u64>,
    pub recoveries: Vec<RecoveryFound>,
    /// Heads given in [`VerifyOptions::heads`] that the chain reached, with their hash.
    pub heads: usize,
    /// `ts` of the last record.
    pub last_ts: Option<String>,
    /// Disclosure records (a batch of a bulk object's records left), each after its decision.
    pub disclosures: u64,
    /// Whether the log ends in a final checkpoint (false only with `open`).
    pub closed: bool,
}

/// The first place where a log is broken: `FILE:LINE: why`, or `FILE: why` when no line is
/// at fault (an empty file).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {why}", file.display(), if *line == 0 { String::new() } else { format!(":{line}") })]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based; 0 when the file could not be read at all, or holds nothing.
    pub line: usize,
    pub why: String,
}

/// Why a log did not verify: it could not be read, or it is broken.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Files(#[from] LogFilesError),
    #[error(transparent)]
    Broken(#[from] Broken),
}

/// Verifies the log at `path` with default options (no trusted key, closed log). A log that
/// cannot be read is reported as broken at line 0; [`verify_log`] tells the two apart.
pub fn verify(path: &Path) -> Result<VerifyReport, Broken> {
    verify_with(path, &VerifyOptions::default())
}

/// [`verify`] with options.
pub fn verify_with(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, Broken> {
    verify_log(path, opts).map_err(|e| match e {
        VerifyError::Broken(b) => b,
        VerifyError::Files(e) => Broken {
            file: path.into(),
            line: 0,
            why: e.to_string(),
        },
    })
}

/// Verifies the log at `path`: a file with its rotated siblings, or a folder holding one
/// chain (see [`crate::audit::files::log_files`]; a folder of several workers' chains is
/// verified chain by chain by [`super::fleet::verify_local`]).
pub fn verify_log(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    verify_files(&log_files(path)?, path, opts)
}

/// Verifies one chain made of `files`, in chain order; `path` names it when it has none.
pub fn verify_files(
    files: &[PathBuf],
    path: &Path,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let mut chain = Chain::new(opts, files.len());
    for (i, file) in files.iter().enumerate() {
        chain.file(file, LineReader::open(file)?, i + 1 == files.len())?;
    }
    let end = files.last().map_or(path, PathBuf::as_path);
    chain.finish(end)
}

/// The last record read.
struct Last {
    file: PathBuf,
    line: usize,
    checkpoint: bool,
    final_: bool,
}

/// The chain as verified so far, file by file (local files, or an instance's shipped files,
/// see [`super::fleet`]).
pub(crate) struct Chain<'o> {
    opts: &'o VerifyOptions,
    /// `seq` of the last good record; 0 before the first.
    seq: u64,
    /// `hash` of the last good record; genesis before the first.
    hash: String,
    /// Reused for each record's canonical bytes.
    canonical: Vec<u8>,
    /// Reused for a checkpoint's canonical bytes without `sig`.
    signed: Vec<u8>,
    scratch: Vec<u8>,
    /// Records since the last checkpoint.
    unsigned: u64,
    /// `seq` of the last signed checkpoint: every checkpoint after it must be signed too.
    last_signed: Option<u64>,
    last: Option<Last>,
    /// A record carrying `instance` was read.
    named: bool,
    /// Ids of the `consent_filtered` decisions whose exchange has not ended (no outcome record
    /// yet): the decisions a disclosure record may name. An id leaves at its outcome, so the
    /// set holds the bulk exchanges in flight, not every one the log holds.
    filtered: HashSet<String>,
    report: VerifyReport,
}

impl<'o> Chain<'o> {
    pub(crate) fn new(opts: &'o VerifyOptions, files: usize) -> Chain<'o> {
        Chain {
            opts,
            seq: 0,
            hash: GENESIS.to_string(),
            canonical: Vec::new(),
            signed: Vec::new(),
            scratch: Vec::new(),
            unsigned: 0,
            last_signed: None,
            last: None,
            named: false,
            filtered: HashSet::new(),
            report: VerifyReport {
                files,
                trusted: !opts.keys.is_empty(),
                ..VerifyReport::default()
            },
        }
    }

    /// `seq` of the last good record; 0 before the first.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Checks the lines of one file (named `path` in messages); every file but the last must
    /// end in a checkpoint.
    pub(crate) fn file(
        &mut self,
        path: &Path,
        mut reader: LineReader,
        last_file: bool,
    ) -> Result<(), VerifyError> {
        let mut last_line = 0;
        while let Some(line) = reader.next_line().map_err(unreadable(path))? {
            last_line = line.number;
            let checked = if line.oversized {
                Err(oversized_why())
            } else if line.complete {
                self.record(line.bytes)
            } else {
                Err(
                    "incomplete record: the log ends mid-line (cut short, or still being written)"
                        .into(),
                )
            };
            let kind = checked.map_err(|why| Broken {
                file: path.into(),
                line: line.number,
                why,
            })?;
            if let Kind::Recovery {
                last_seq,
                torn_bytes,
                expected_seq,
            } = kind
            {
                self.report.recoveries.push(RecoveryFound {
                    file: path.into(),
                    line: line.number,
                    seq: self.seq,
                    last_seq,
                    torn_bytes,
                    expected_seq,
                });
            }
            self.last = Some(Last {
                file: path.into(),
                line: line.number,
                checkpoint: matches!(kind, Kind::Checkpoint { .. }),
                final_: matches!(kind, Kind::Checkpoint { final_: true }),
            });
        }
        if !last_file {
            // Rotation closes a file with a checkpoint; without it, its end was cut off.
            let ends_signed = last_line > 0 && self.last.as_ref().is_some_and(|l| l.checkpoint);
            if !ends_signed {
                return Err(Broken {
                    file: path.into(),
                    line: last_line,
                    why: "a rotated file must end with a checkpoint: records were cut off its end"
                        .into(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// After the last file: the log must reach every head given, and end in a final
    /// checkpoint, unless it is open.
    pub(crate) fn finish(mut self, end: &Path) -> Result<VerifyReport, VerifyError> {
        self.report.last_seq = self.seq;
        if let Some(beyond) = self
            .opts
            .heads
            .iter()
            .map(|h| h.seq)
            .filter(|&s| s > self.seq)
            .max()
        {
            let (file, line) = match &self.last {
                Some(l) => (l.file.clone(), l.line),
                None => (end.into(), 0),
            };
            return Err(Broken {
                file,
                line,
                why: format!(
                    "the log ends at seq {}, before seq {beyond}, a head recorded outside the log: the records after seq {} were cut off",
                    self.seq, self.seq
                ),
            }
            .into());
        }
        match &self.last {
            Some(l) if l.final_ => {
                self.report.closed = true;
                Ok(self.report)
            }
            _ if self.opts.open => {
                self.report.unsigned_tail = self.unsigned;
                Ok(self.report)
            }
            None => Err(Broken {
                file: end.into(),
                line: 0,
                why: "the file is empty: no records and no final checkpoint (truncated, or just opened by a proxy: pass --open)".into(),
            }
            .into()),
            Some(l) => {
                let unsigned = match self.report.last_checkpoint {
                    Some(c) => format!(
                        "{} records after the checkpoint at seq {c} are unsigned",
                        self.unsigned
                    ),
                    None => "no checkpoint signs it".into(),
                };
                Err(Broken {
                    file: l.file.clone(),
                    line: l.line,
                    why: format!(
                        "open or truncated: the log ends at seq {} without a final checkpoint ({unsigned}); pass --open if the proxy is still writing it",
                        self.seq
                    ),
                }
                .into())
            }
        }
    }

    /// Checks one line against the chain so far and, if it holds, moves the chain on.
    fn record(&mut self, line: &[u8]) -> Result<Kind, String> {
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
        let kind = fields
            .get("kind")
            .and_then(Value::as_str)
            .map(str::to_string);

        // Judged once the hash holds, so that an edit is reported as one.
        // Records written before the log had a name (a log that started shipping after an
        // upgrade) carry none; once one does, every later one must.
        let named = self.named;
        let misplaced = self.opts.instance.as_ref().and_then(|want| match fields.get("instance") {
            Some(Value::String(got)) if got == want => None,
            Some(Value::String(got)) => Some(format!(
                "record of instance {got} among instance {want}'s files: it was moved from another chain"
            )),
            None if !named => None,
            _ => Some(format!(
                "record names no instance among instance {want}'s files, after records that do"
            )),
        });
        let names_itself = fields.contains_key("instance");
        let ts = match fields.get("ts") {
            Some(Value::String(ts)) => Some(ts.clone()),
            _ => None,
        };
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
        if let Some(why) = misplaced {
            return Err(why);
        }
        self.named |= names_itself;
        if let Some(ts) = ts {
            self.report.last_ts = Some(ts);
        }
        if let Some(h) = self.opts.heads.iter().find(|h| h.seq == seq) {
            if h.hash != hash {
                return Err(format!(
                    "record seq {seq} is not the head recorded outside the log (hash {}): the log was rewritten up to here (cut back, then continued)",
                    h.hash
                ));
            }
            self.report.heads += 1;
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

        let kind = self.kind(kind.as_deref(), &mut value, seq)?;
        self.seq = seq;
        self.hash = hash;
        if let Kind::Checkpoint { .. } = kind {
            self.report.checkpoints += 1;
            self.report.last_checkpoint = Some(seq);
            self.unsigned = 0;
        } else {
            self.report.records += 1;
            self.unsigned += 1;
        }
        Ok(kind)
    }

    /// Checks what a record of `kind` (chained at `seq`, `value` without its `hash`) says,
    /// beyond the chain: a checkpoint's signature, a recovery record's claims, a disclosure's
    /// decision; and notes the bulk exchanges that decisions open and outcomes close.
    fn kind(&mut self, kind: Option<&str>, value: &mut Value, seq: u64) -> Result<Kind, String> {
        let id = |value: &Value| value.get("id").and_then(Value::as_str).map(str::to_string);
        Ok(match kind {
            Some("checkpoint") => Kind::Checkpoint {
                final_: self.checkpoint(value)?,
            },
            Some("recovery") => self.recovery(value, seq)?,
            Some("disclosure") => self.disclosure(value)?,
            Some("decision") => {
                if value.get("reason").and_then(Value::as_str) == Some("consent_filtered")
                    && let Some(id) = id(value)
                {
                    self.filtered.insert(id);
                }
                Kind::Record
            }
            Some("outcome") => {
                if let Some(id) = id(value) {
                    self.filtered.remove(&id);
                }
                Kind::Record
            }
            _ => Kind::Record,
        })
    }

    /// Checks a disclosure record against the decisions before it: it must name a
    /// `consent_filtered` decision of this chain whose exchange has not ended.
    fn disclosure(&mut self, value: &Value) -> Result<Kind, String> {
        let id = value.get("id").and_then(Value::as_str).unwrap_or_default();
        if !self.filtered.contains(id) {
            return Err(format!(
                "disclosure for an unknown decision: no decision record before it in this chain has id \"{id}\" and reason consent_filtered with its exchange still open (a disclosure follows its decision and precedes its outcome)"
            ));
        }
        self.report.disclosures += 1;
        Ok(Kind::Record)
    }

    /// Checks a recovery record at `seq` against the chain before it. One written by a
    /// running writer names the head it had written (`expected`): a file that ended before
    /// that head, or at it with another record, lost records while the proxy ran.
    fn recovery(&self, value: &Value, seq: u64) -> Result<Kind, String> {
        let field = |k: &str| value.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (last_seq, torn_bytes) = (field("last_seq"), field("torn_bytes"));
        if last_seq + 1 != seq {
            return Err(format!(
                "recovery record says the log ended at seq {last_seq}, but it follows seq {}",
                self.seq
            ));
        }
        let expected = match value.get("expected") {
            None => None,
            Some(e) => Some(
                e.get("seq")
                    .and_then(Value::as_u64)
                    .zip(e.get("hash").and_then(Value::as_str))
                    .ok_or("field expected is not an object with seq and hash")?,
            ),
        };
        match expected {
            Some((exp, _)) if exp > last_seq => {
                return Err(format!(
                    "records removed while the proxy ran: the writer had written up to seq {exp}, but its file, reopened after a failed write, ended at seq {last_seq} ({} records gone)",
                    exp - last_seq
                ));
            }
            Some((exp, hash)) if exp == last_seq && hash != self.hash => {
                return Err(format!(
                    "records replaced while the proxy ran: the writer's record seq {exp} is not the one its file, reopened after a failed write, ended with"
                ));
            }
            _ => {}
        }
        Ok(Kind::Recovery {
            last_seq,
            torn_bytes,
            expected_seq: expected.map(|(exp, _)| exp),
        })
    }

    /// Checks a checkpoint's signature (see [`crate::audit::checkpoint`]); returns whether it is
    /// final. `value` is the checkpoint without `hash`.
    fn checkpoint(&mut self, value: &mut Value) -> Result<bool, String> {
        let Value::Object(fields) = value else {
            return Err("not a JSON object".into());
        };
        let final_ = match fields.get("final") {
            Some(Value::Bool(b)) => *b,
            None => return Err("checkpoint without field final".into()),
            Some(_) => return Err("field final is not true or false".into()),
        };
        let sig = match fields.remove("sig") {
            None | Some(Value::Null) => {
                if !self.opts.keys.is_empty() {
                    return Err(
                        "checkpoint is not signed, but a key was given to check signatures".into(),
                    );
                }
                if let Some(at) = self.last_signed {
                    return Err(format!(
                        "signature removed: the checkpoint is not signed, but the one at seq {at} was (the writer never drops its key, unless the proxy was restarted without it)"
                    ));
                }
                // The writer names a key only in checkpoints it signs.
                if fields.get("key").is_some_and(|k| !k.is_null()) {
                    return Err(
                        "signature removed: the checkpoint names a signing key but carries no signature"
                            .into(),
                    );
                }
                self.report.unsigned_checkpoints += 1;
                return Ok(final_);
            }
            Some(Value::String(s)) => hex::decode(&s)
                .ok()
                .filter(|s| s.len() == 64)
                .ok_or("field sig is not a hex Ed25519 signature")?,
            Some(_) => return Err("field sig is not a string".into()),
        };
        let key = fields
            .get("key")
            .and_then(Value::as_str)
            .ok_or("signed checkpoint without field key")?
            .to_string();
        let public_key = fields
            .get("public_key")
            .and_then(Value::as_str)
            .and_then(|k| hex::decode(k).ok())
            .filter(|k| k.len() == 32)
            .ok_or("field public_key is not a hex Ed25519 public key")?;
        if keys::fingerprint(&public_key) != key {
            return Err(
                "field key is not the fingerprint of the public key the checkpoint carries".into(),
            );
        }
        if !self.opts.keys.is_empty() && !self.opts.keys.contains(&public_key) {
            let given: Vec<String> = self
                .opts
                .keys
                .iter()
                .map(|k| keys::fingerprint(k))
                .collect();
            return Err(format!(
                "checkpoint signed by {key}, not by the given key ({})",
                given.join(", ")
            ));
        }
        self.signed.clear();
        canonical_json(value, &mut self.signed);
        if !checkpoint::verify(&public_key, &self.signed, &sig, &mut self.scratch) {
            return Err("signature does not verify: the checkpoint was forged or altered".into());
        }
        self.report.signed += 1;
        self.last_signed = Some(self.seq + 1);
        if !self.report.signers.contains(&key) {
            self.report.signers.push(key);
        }
        Ok(final_)
    }
}

/// What a verified line was.
enum Kind {
    Record,
    Checkpoint {
        final_: bool,
    },
    Recovery {
        last_seq: u64,
        torn_bytes: u64,
        expected_seq: Option<u64>,
    },
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
    use crate::audit::keys::SigningKey;
    use crate::audit::record::Record;
    use crate::audit::testing::{
        decision_at, disclosure, outcome, policy, settings, test_key, write_bulk_log, write_log,
        write_log_with,
    };
    use crate::audit::write::LogWriter;
    use crate::policy::Reason;
    use crate::policy::model::Durability;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A real log of six records and its final checkpoint, written by the writer; returns
    /// its lines (with `\n`).
    fn written_log(dir: &Path) -> Vec<String> {
        let path = dir.join("source.jsonl");
        block_on(write_log(&path, 0..6));
        take_lines(&path)
    }

    /// Ten records signed by `key`, a checkpoint after every fourth, and the final one.
    fn signed_log(dir: &Path, key: &std::sync::Arc<SigningKey>) -> Vec<String> {
        let path = dir.join("signed-source.jsonl");
        block_on(write_log_with(&path, 0..10, Some(key.clone()), |s| {
            s.checkpoint_every = 4
        }));
        take_lines(&path)
    }

    fn take_lines(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap();
        std::fs::remove_file(path).unwrap();
        text.split_inclusive('\n').map(str::to_string).collect()
    }

    fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, lines.concat()).unwrap();
        path
    }

    fn broken_at(path: &Path, line: usize, why: &str) {
        broken_with(path, &VerifyOptions::default(), line, why);
    }

    fn broken_with(path: &Path, opts: &VerifyOptions, line: usize, why: &str) {
        let b = verify_with(path, opts).unwrap_err();
        assert_eq!((b.file.as_path(), b.line), (path, line), "{b}");
        assert!(b.why.contains(why), "expected {why:?}, got {b}");
    }

    fn trusting(key: &SigningKey) -> VerifyOptions {
        VerifyOptions {
            keys: vec![key.public_key().to_vec()],
            ..VerifyOptions::default()
        }
    }

    /// Rewrites line `i` through `edit`, with a hash recomputed as a forger would.
    fn rehash(lines: &mut [String], i: usize, edit: impl FnOnce(&mut Value)) {
        let mut v: Value = serde_json::from_str(&lines[i]).unwrap();
        edit(&mut v);
        v.as_object_mut().unwrap().remove("hash");
        let mut bytes = Vec::new();
        canonical_json(&v, &mut bytes);
        let prev = v["prev"].as_str().unwrap().to_string();
        // Written as the writer writes: canonical, `hash` last.
        bytes.pop();
        lines[i] = format!(
            "{},\"hash\":\"{}\"}}\n",
            String::from_utf8(bytes).unwrap(),
            link(&prev, &{
                let mut c = Vec::new();
                canonical_json(&v, &mut c);
                c
            })
        );
    }

    #[test]
    fn an_untouched_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "d.jsonl", &written_log(dir.path()));
        let report = verify(&path).unwrap();
        assert_eq!((report.records, report.checkpoints), (6, 1));
        // Written without a key: its checkpoint is unsigned, and the report says so.
        assert_eq!((report.signed, report.unsigned_checkpoints), (0, 1));
    }

    #[test]
    fn an_empty_log_is_open_or_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "d.jsonl", &[]);
        broken_at(&path, 0, "the file is empty");
        assert_eq!(
            verify(&path).unwrap_err().to_string(),
            format!(
                "{}: the file is empty: no records and no final checkpoint (truncated, or just opened by a proxy: pass --open)",
                path.display()
            )
        );
        let open = VerifyOptions {
            open: true,
            ..VerifyOptions::default()
        };
        assert_eq!(verify_with(&path, &open).unwrap().records, 0);
        assert_eq!(verify_with(dir.path(), &open).unwrap().records, 0);
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
        rehash(&mut lines, 3, |v| {
            v["decision"] = "allow".into();
            v["prev"] = "ab".repeat(32).into();
        });
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 4, "prev does not match the previous record's hash");
    }

    #[test]
    fn garbage_at_the_end_is_not_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = written_log(dir.path());
        lines.push("garbage\n".into());
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(&path, 8, "not JSON");
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
        // Cut at a line boundary, before the final checkpoint.
        let path = write(dir.path(), "early.jsonl", &lines[..5]);
        broken_at(&path, 5, "open or truncated: the log ends at seq 5");
    }

    /// Found by review: a damaged file with no newline (say, NUL bytes after a crash) was
    /// read whole into memory before verify could say anything.
    #[test]
    fn regression_an_endless_line_is_broken_without_being_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let lines = written_log(dir.path());
        let path = dir.path().join("d.jsonl");
        let mut bytes = lines[..3].concat().into_bytes();
        bytes.resize(bytes.len() + crate::audit::files::MAX_LINE + 1, 0);
        std::fs::write(&path, bytes).unwrap();
        broken_at(&path, 4, "line longer than 16 MiB: not a record");
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
    fn signatures_are_checked_against_the_given_key_or_the_carried_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let lines = signed_log(dir.path(), &key);
        // Checkpoints after records 4 and 8 (seq 5 and 10), and the final one.
        assert_eq!(lines.len(), 13);
        let path = write(dir.path(), "d.jsonl", &lines);
        let report = verify_with(&path, &trusting(&key)).unwrap();
        assert_eq!((report.records, report.checkpoints), (10, 3));
        assert_eq!((report.signed, report.trusted), (3, true));
        let report = verify(&path).unwrap();
        assert_eq!((report.signed, report.trusted), (3, false));
        assert_eq!(report.signers, [key.fingerprint()]);

        // Another key is not trusted.
        let other = test_key();
        broken_with(
            &path,
            &trusting(&other),
            5,
            &format!(
                "checkpoint signed by {}, not by the given key ({})",
                key.fingerprint(),
                other.fingerprint()
            ),
        );
        // An unsigned log where a key is expected.
        let unsigned = write(dir.path(), "unsigned.jsonl", &written_log(dir.path()));
        broken_with(&unsigned, &trusting(&key), 7, "checkpoint is not signed");
    }

    #[test]
    fn a_replaced_signature_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let mut lines = signed_log(dir.path(), &key);
        let final_sig: Value = serde_json::from_str(&lines[12]).unwrap();
        // The final checkpoint carries the first one's signature, rehashed: nothing after it
        // links to its hash, so only the signature can catch it.
        let first: Value = serde_json::from_str(&lines[4]).unwrap();
        assert_ne!(first["sig"], final_sig["sig"]);
        rehash(&mut lines, 12, |v| v["sig"] = first["sig"].clone());
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_with(&path, &trusting(&key), 13, "signature does not verify");
        broken_at(&path, 13, "signature does not verify");
        // A fingerprint that does not belong to the carried public key.
        let mut lines = signed_log(dir.path(), &key);
        rehash(&mut lines, 12, |v| {
            v["key"] = test_key().fingerprint().into()
        });
        let path = write(dir.path(), "fp.jsonl", &lines);
        broken_at(&path, 13, "field key is not the fingerprint");
    }

    /// Found by review: without `--key`, a record edited, the chain rewritten after it and
    /// the signatures it broke removed still verified, as "written without a signing key".
    #[test]
    fn regression_a_removed_signature_was_taken_for_an_unsigned_log() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        // Checkpoints at lines 5 and 10, the final one at 13.
        let mut lines = signed_log(dir.path(), &key);
        rehash(&mut lines, 6, |v| v["decision"] = "allow".into());
        for i in 7..lines.len() {
            let prev: Value = serde_json::from_str(&lines[i - 1]).unwrap();
            rehash(&mut lines, i, |v| {
                v["prev"] = prev["hash"].clone();
                if v["kind"] == "checkpoint" {
                    v.as_object_mut().unwrap().remove("sig");
                }
            });
        }
        let path = write(dir.path(), "d.jsonl", &lines);
        broken_at(
            &path,
            10,
            "signature removed: the checkpoint is not signed, but the one at seq 5 was",
        );
        // The key fields taken out too: still not a log written without a key.
        for i in 7..lines.len() {
            let prev: Value = serde_json::from_str(&lines[i - 1]).unwrap();
            rehash(&mut lines, i, |v| {
                v["prev"] = prev["hash"].clone();
                if v["kind"] == "checkpoint" {
                    v["key"] = Value::Null;
                    v["public_key"] = Value::Null;
                }
            });
        }
        let path = write(dir.path(), "nokey.jsonl", &lines);
        broken_at(&path, 10, "signature removed");
        // Every signature stripped, with the key still named: not what the writer writes.
        let mut lines = signed_log(dir.path(), &key);
        for i in 0..lines.len() {
            let prev = match i {
                0 => Value::from(GENESIS),
                _ => serde_json::from_str::<Value>(&lines[i - 1]).unwrap()["hash"].clone(),
            };
            rehash(&mut lines, i, |v| {
                v["prev"] = prev;
                if v["kind"] == "checkpoint" {
                    v.as_object_mut().unwrap().remove("sig");
                }
            });
        }
        let path = write(dir.path(), "all.jsonl", &lines);
        broken_at(
            &path,
            5,
            "signature removed: the checkpoint names a signing key but carries no signature",
        );
    }

    /// A log cut back and then continued by a restart verifies, signatures and all (the
    /// restart's recovery record and checkpoint sign the shortened chain); a head kept
    /// outside the log shows that records are missing, or were rewritten.
    #[test]
    fn a_head_recorded_elsewhere_must_be_reached_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let lines = signed_log(dir.path(), &key);
        let head = |i: usize| {
            let v: Value = serde_json::from_str(&lines[i]).unwrap();
            format!("{}:{}", v["seq"], v["hash"].as_str().unwrap())
                .parse::<KnownHead>()
                .unwrap()
        };
        let with = |heads: Vec<KnownHead>| VerifyOptions {
            heads,
            ..trusting(&key)
        };
        let path = write(dir.path(), "d.jsonl", &lines);
        let report = verify_with(&path, &with(vec![head(4), head(12)])).unwrap();
        assert_eq!(report.heads, 2);

        // Cut after the checkpoint at seq 10: the final checkpoint (seq 13) is missing.
        let cut = write(dir.path(), "cut.jsonl", &lines[..10]);
        let open = VerifyOptions {
            open: true,
            ..with(vec![head(12)])
        };
        verify_with(
            &cut,
            &VerifyOptions {
                open: true,
                ..trusting(&key)
            },
        )
        .unwrap();
        broken_with(
            &cut,
            &open,
            10,
            "the log ends at seq 10, before seq 13, a head recorded outside the log: the records after seq 10 were cut off",
        );
        // ... and a restart carries on from the cut: seq 13 is now another record.
        block_on(write_log_with(&cut, 20..22, Some(key.clone()), |_| {}));
        let report = verify_with(&cut, &trusting(&key)).unwrap();
        assert_eq!(report.recoveries.len(), 1);
        broken_with(
            &cut,
            &with(vec![head(12)]),
            13,
            "record seq 13 is not the head recorded outside the log",
        );

        assert!("13:abc".parse::<KnownHead>().is_err());
        assert!("x:".parse::<KnownHead>().is_err());
        assert_eq!(
            format!("7:{}", "AB".repeat(32))
                .parse::<KnownHead>()
                .unwrap(),
            KnownHead {
                seq: 7,
                hash: "ab".repeat(32)
            }
        );
    }

    #[test]
    fn an_open_log_passes_with_open_and_reports_its_unsigned_tail() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let lines = signed_log(dir.path(), &key);
        // Up to record 9 (seq 11): one record after the checkpoint at seq 10.
        let path = write(dir.path(), "d.jsonl", &lines[..11]);
        broken_with(
            &path,
            &trusting(&key),
            11,
            "open or truncated: the log ends at seq 11 without a final checkpoint (1 records after the checkpoint at seq 10 are unsigned)",
        );
        let open = VerifyOptions {
            open: true,
            ..trusting(&key)
        };
        let report = verify_with(&path, &open).unwrap();
        assert_eq!(
            (report.records, report.unsigned_tail, report.last_checkpoint),
            (9, 1, Some(10))
        );
    }

    #[test]
    fn a_folder_is_one_chain_of_rotated_files_each_ending_in_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let lines = signed_log(dir.path(), &key);
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let active = logs.join("decisions.jsonl");
        let t = jiff::Timestamp::UNIX_EPOCH;
        let first = crate::audit::files::rotated_name(&active, 1, t);
        let second = crate::audit::files::rotated_name(&active, 6, t);
        write(&logs, "notes.txt", &["not a log\n".to_string()]);
        std::fs::write(&first, lines[..5].concat()).unwrap();
        std::fs::write(&second, lines[5..10].concat()).unwrap();
        std::fs::write(&active, lines[10..].concat()).unwrap();
        let report = verify_with(&logs, &trusting(&key)).unwrap();
        assert_eq!((report.records, report.files), (10, 3));
        assert_eq!(verify_with(&active, &trusting(&key)).unwrap(), report);

        let broken_in = |file: &Path, line: usize, why: &str| {
            let b = verify_with(&active, &trusting(&key)).unwrap_err();
            assert_eq!((b.file.as_path(), b.line), (file, line), "{b}");
            assert!(b.why.contains(why), "expected {why:?}, got {b}");
        };
        // A rotated file whose closing checkpoint was cut off.
        std::fs::write(&first, lines[..4].concat()).unwrap();
        broken_in(&first, 4, "a rotated file must end with a checkpoint");
        // A rotated file deleted: the next one starts too late.
        std::fs::remove_file(&first).unwrap();
        broken_in(&second, 1, "seq 6 at the start of the log");
    }

    #[test]
    fn an_unreadable_path_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        assert!(matches!(
            verify_log(&missing, &VerifyOptions::default()),
            Err(VerifyError::Files(LogFilesError::Read { .. }))
        ));
    }

    #[test]
    fn a_disclosure_after_its_consent_filtered_decision_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        block_on(write_bulk_log(&path));
        let report = verify(&path).unwrap();
        assert_eq!((report.records, report.disclosures), (11, 3));
    }

    /// A disclosure stands for records that left under a decision of the same chain: one
    /// that names no such decision (written by the real writer, so the chain itself holds)
    /// fails, whatever else holds.
    #[test]
    fn a_disclosure_for_an_unknown_decision_fails() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let cases: [(&str, Vec<Record>, usize); 4] = [
            (
                "no decision",
                vec![disclosure("x1", 1, 1, 1, &[("u1", Some("c-1"))])],
                1,
            ),
            (
                "a decision about one subject",
                vec![
                    Record::Decision(Box::new(decision_at(
                        &p,
                        "p1",
                        0,
                        Reason::Consented,
                        "/payments/u1/x.json",
                    ))),
                    disclosure("p1", 1, 1, 1, &[("u1", Some("c-1"))]),
                ],
                2,
            ),
            (
                "after the exchange's outcome",
                vec![
                    Record::Decision(Box::new(decision_at(
                        &p,
                        "b1",
                        0,
                        Reason::ConsentFiltered,
                        "/exports/x.jsonl",
                    ))),
                    outcome("b1", 1, 10),
                    disclosure("b1", 2, 1, 1, &[("u1", Some("c-1"))]),
                ],
                3,
            ),
            (
                "of another exchange",
                vec![
                    Record::Decision(Box::new(decision_at(
                        &p,
                        "b1",
                        0,
                        Reason::ConsentFiltered,
                        "/exports/x.jsonl",
                    ))),
                    disclosure("b2", 1, 1, 1, &[("u1", Some("c-1"))]),
                ],
                2,
            ),
        ];
        for (i, (case, records, line)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("d{i}.jsonl"));
            block_on(async {
                let w = LogWriter::open(&settings(&p, &path, Durability::Write), None).unwrap();
                for r in records {
                    w.append(r).await.unwrap();
                }
                w.close().await;
            });
            let b = verify(&path).unwrap_err();
            assert_eq!(b.line, line, "{case}: {b}");
            assert!(
                b.why.starts_with("disclosure for an unknown decision"),
                "{case}: {b}"
            );
        }
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
