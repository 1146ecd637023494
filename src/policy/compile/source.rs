//! The policy's files: reading the entry file and its includes (through the reader the caller
//! injects, so that the compiler does no I/O), parsing each one, reporting unknown keys and
//! refused includes, merging them into one view whose items remember their file, and finding
//! the line of any setting for a diagnostic.
//!
//! Apart from the sections because it knows TOML and files while they know only the raw
//! policy: a section never reads a file, and this never judges a setting.

use super::diagnostic::{Diagnostic, PolicyError};
use super::placement::{self, Side};
use crate::policy::raw::*;
use std::path::{Path, PathBuf};

/// A segment of a location inside one TOML document.
#[derive(Clone, Debug)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// One file of the policy, as read.
pub(super) struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// Where an item came from: the file and its position in that file's array.
#[derive(Clone, Copy, Debug)]
pub(super) struct Origin {
    pub file: usize,
    pub index: usize,
}

/// Every file of a policy, read and parsed.
pub(super) struct Loaded {
    pub sources: Vec<Source>,
    pub diags: Vec<Diagnostic>,
    /// One merged view; every array item remembers its origin.
    pub file: MergedFile,
    /// A file could not be parsed, so the merged view is incomplete.
    pub unparsed: bool,
    /// The part of a split policy the files being read are: `Whole` turns into `Sidecar`
    /// when the entry file has `[policy.source]`.
    pub side: Side,
}

/// The policy's sections, from whichever file defined them (a table by one file only, the
/// items of an array from every file, in load order).
#[derive(Default)]
pub(super) struct MergedFile {
    pub policy: Option<(usize, RawPolicy)>,
    pub policy_source: Option<(usize, RawPolicySource)>,
    pub proxy: Option<(usize, RawProxy)>,
    pub jurisdictions: Vec<(usize, String, Vec<String>)>,
    pub geo: Option<(usize, RawGeo)>,
    pub networks: Vec<(Origin, RawNetwork)>,
    pub upstreams: Vec<(Origin, RawUpstream)>,
    pub recipients: Vec<(Origin, RawRecipient)>,
    pub datasets: Vec<(Origin, RawDataset)>,
    pub consent: Option<(usize, RawConsent)>,
    pub log: Option<(usize, RawLog)>,
    pub admin: Option<(usize, RawAdmin)>,
    pub tls: Option<(usize, RawTls)>,
}

/// How deep includes may nest.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Reads the policy at `entry` and every file it includes, through `read`. Only a file that
/// cannot be read is an error here; every other problem is a diagnostic in `Loaded`.
pub(super) fn read_all(
    entry: &Path,
    read: impl FnMut(&Path) -> std::io::Result<String>,
    side: Side,
) -> Result<Loaded, PolicyError> {
    let mut loaded = Loaded {
        sources: Vec::new(),
        diags: Vec::new(),
        file: MergedFile::default(),
        unparsed: false,
        side,
    };
    read_more(&mut loaded, entry, read, side)?;
    Ok(loaded)
}

/// Reads another policy (`entry` and its includes) as part `side` of the one `loaded` holds:
/// a bundle's files after the sidecar's own.
pub(super) fn read_more(
    loaded: &mut Loaded,
    entry: &Path,
    mut read: impl FnMut(&Path) -> std::io::Result<String>,
    side: Side,
) -> Result<(), PolicyError> {
    loaded.side = side;
    let mut stack = Vec::new();
    load_file(entry, &mut read, loaded, &mut stack)
}

/// The policy's hash: `sha256:` over every source file (its path and text), in load order.
pub(super) fn hash(sources: &[Source]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for s in sources {
        ctx.update(s.path.to_string_lossy().as_bytes());
        ctx.update(&[0]);
        ctx.update(s.text.as_bytes());
        ctx.update(&[0]);
    }
    format!("sha256:{}", hex::encode(ctx.finish().as_ref()))
}

fn load_file(
    path: &Path,
    read: &mut impl FnMut(&Path) -> std::io::Result<String>,
    loaded: &mut Loaded,
    stack: &mut Vec<PathBuf>,
) -> Result<(), PolicyError> {
    let text = read(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = loaded.sources.len();
    loaded.sources.push(Source {
        path: path.to_path_buf(),
        text: text.clone(),
    });
    let Some(mut raw) = parse(path, &text, &mut loaded.diags) else {
        loaded.unparsed = true;
        return Ok(());
    };
    let entry = stack.is_empty();
    // The entry file decides, before its includes are read, whether they are a sidecar's.
    if entry
        && loaded.side == Side::Whole
        && raw.policy.as_ref().is_some_and(|p| p.source.is_some())
    {
        loaded.side = Side::Sidecar;
    }
    for m in placement::take_misplaced(loaded.side, entry, &mut raw) {
        let segs: Vec<Seg> = m.at.iter().map(|k| Seg::Key((*k).into())).collect();
        loaded.diags.push(Diagnostic {
            file: path.to_path_buf(),
            line: line_of(&text, &segs),
            rule: m.rule.into(),
            message: m.message,
        });
    }
    stack.push(path.to_path_buf());
    // Included files stand where the `include` key is: before this file's own items.
    include(path, &text, &raw.include, read, loaded, stack)?;
    merge(loaded, file, raw);
    stack.pop();
    Ok(())
}

/// Parses one file, reporting its unknown keys; `None` (after reporting why) when it is not
/// a policy file at all.
fn parse(path: &Path, text: &str, diags: &mut Vec<Diagnostic>) -> Option<RawFile> {
    match parse_file(text) {
        Ok((raw, unknown)) => {
            for seg in unknown {
                diags.push(Diagnostic {
                    file: path.to_path_buf(),
                    line: line_of(text, &seg),
                    rule: display_segments(&seg),
                    message: "unknown key".into(),
                });
            }
            Some(raw)
        }
        Err(e) => {
            let line = e.span().map(|s| line_at(text, s.start));
            // A value of the wrong type is named by its path; a syntax error has none.
            let rule = e
                .span()
                .and_then(|s| path_at(text, s.start))
                .map(|segs| display_segments(&segs))
                .unwrap_or_default();
            diags.push(Diagnostic {
                file: path.to_path_buf(),
                line,
                rule,
                message: e.message().trim().to_string(),
            });
            None
        }
    }
}

/// Loads the files that `path` includes, in order.
fn include(
    path: &Path,
    text: &str,
    includes: &[String],
    read: &mut impl FnMut(&Path) -> std::io::Result<String>,
    loaded: &mut Loaded,
    stack: &mut Vec<PathBuf>,
) -> Result<(), PolicyError> {
    let base = path.parent().unwrap_or(Path::new(""));
    for (i, inc) in includes.iter().enumerate() {
        let inc_path = base.join(inc);
        // A cycle, a second inclusion, or nesting too deep (a cycle spelled through
        // different paths, `a/../x.toml`) is reported instead of loaded again: loading
        // again would repeat every definition, and re-including would not terminate.
        let refused = if stack.contains(&inc_path) {
            Some(format!(
                "\"{inc}\" includes itself (cycle through {})",
                inc_path.display()
            ))
        } else if loaded.sources.iter().any(|s| s.path == inc_path) {
            Some(format!(
                "\"{inc}\" is already included ({}); a file can be included only once",
                inc_path.display()
            ))
        } else if stack.len() >= MAX_INCLUDE_DEPTH {
            Some(format!(
                "\"{inc}\" is nested more than {MAX_INCLUDE_DEPTH} includes deep"
            ))
        } else {
            None
        };
        if let Some(message) = refused {
            loaded.diags.push(Diagnostic {
                file: path.to_path_buf(),
                line: line_of(text, &[Seg::Key("include".into()), Seg::Index(i)]),
                rule: "include".into(),
                message,
            });
            continue;
        }
        load_file(&inc_path, read, loaded, stack)?;
    }
    Ok(())
}

/// Adds the sections of file number `file` to the merged view.
fn merge(loaded: &mut Loaded, file: usize, raw: RawFile) {
    let RawFile {
        include: _,
        policy,
        proxy,
        jurisdictions,
        geo,
        networks,
        upstreams,
        recipients,
        datasets,
        consent,
        log,
        admin,
        tls,
    } = raw;
    let (m, d, s) = (&mut loaded.file, &mut loaded.diags, &loaded.sources[..]);
    // `[policy.source]` is a table of its own: in a split policy the sidecar's `[policy]`
    // holds only it, and the bundle's `[policy]` the rules.
    let mut policy = policy;
    let source = policy.as_mut().and_then(|p| p.source.take());
    single(&mut m.policy_source, "policy.source", source, file, s, d);
    let policy = policy.filter(|p| p.has_rules() || loaded.side == Side::Whole);
    single(&mut m.policy, "policy", policy, file, s, d);
    single(&mut m.proxy, "proxy", proxy, file, s, d);
    single(&mut m.geo, "geo", geo, file, s, d);
    single(&mut m.consent, "consent", consent, file, s, d);
    single(&mut m.log, "log", log, file, s, d);
    single(&mut m.admin, "admin", admin, file, s, d);
    single(&mut m.tls, "tls", tls, file, s, d);
    for (name, codes) in jurisdictions.unwrap_or_default() {
        m.jurisdictions.push((file, name, codes));
    }
    m.networks.extend(items(file, networks));
    m.upstreams.extend(items(file, upstreams));
    m.recipients.extend(items(file, recipients));
    m.datasets.extend(items(file, datasets));
}

/// The items of one file's array, each with its origin.
fn items<T>(file: usize, v: Vec<T>) -> impl Iterator<Item = (Origin, T)> {
    v.into_iter()
        .enumerate()
        .map(move |(index, x)| (Origin { file, index }, x))
}

/// Puts a table that only one file may define into `slot`: the first definition stands, and
/// a second one is reported where it is written.
fn single<T>(
    slot: &mut Option<(usize, T)>,
    name: &str,
    value: Option<T>,
    file: usize,
    sources: &[Source],
    diags: &mut Vec<Diagnostic>,
) {
    let Some(value) = value else { return };
    match slot {
        Some((prev, _)) => {
            let here = &sources[file];
            diags.push(Diagnostic {
                file: here.path.clone(),
                line: line_of(
                    &here.text,
                    &name
                        .split('.')
                        .map(|k| Seg::Key(k.into()))
                        .collect::<Vec<_>>(),
                ),
                rule: name.into(),
                message: format!(
                    "[{name}] is already defined in {}",
                    sources[*prev].path.display()
                ),
            });
        }
        None => *slot = Some((file, value)),
    }
}

fn parse_file(text: &str) -> Result<(RawFile, Vec<Vec<Seg>>), toml::de::Error> {
    let de = toml::de::Deserializer::parse(text)?;
    let mut unknown = Vec::new();
    let raw = serde_ignored::deserialize(de, |p| unknown.push(segments(&p)))?;
    Ok((raw, unknown))
}

fn segments(p: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path as P;
    match p {
        P::Root => Vec::new(),
        P::Seq { parent, index } => {
            let mut v = segments(parent);
            v.push(Seg::Index(*index));
            v
        }
        P::Map { parent, key } => {
            let mut v = segments(parent);
            v.push(Seg::Key(key.to_string()));
            v
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            segments(parent)
        }
    }
}

fn display_segments(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The line of the value at `segs` in `text`, or of the nearest enclosing item that exists.
pub(super) fn line_of(text: &str, segs: &[Seg]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut best = None;
    let mut table: &DeTable<'_> = root.get_ref();
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    for seg in segs {
        let next = match (seg, value.map(|v| v.get_ref())) {
            (Seg::Key(k), None) => table.get(k.as_str()),
            (Seg::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
            (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = Some(next.span().start);
        if let DeValue::Table(t) = next.get_ref() {
            table = t;
        }
        value = Some(next);
    }
    best.map(|o| line_at(text, o))
}

/// The path of the innermost value of `text` whose span holds `offset`, when `text` is
/// valid TOML (that is, when `offset` comes from a deserialisation error).
fn path_at(text: &str, offset: usize) -> Option<Vec<Seg>> {
    use toml::de::{DeTable, DeValue};
    type Value<'a> = toml::Spanned<DeValue<'a>>;
    fn in_table(t: &DeTable<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        t.iter().any(|(k, v)| {
            path.push(Seg::Key(k.get_ref().to_string()));
            in_value(v, offset, path) || {
                path.pop();
                false
            }
        })
    }
    // Tables and arrays are searched whatever their own span says: a `[table]`'s span
    // need not cover the keys under it.
    fn in_value(v: &Value<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        let inside = match v.get_ref() {
            DeValue::Table(t) => in_table(t, offset, path),
            DeValue::Array(a) => a.iter().enumerate().any(|(i, x)| {
                path.push(Seg::Index(i));
                in_value(x, offset, path) || {
                    path.pop();
                    false
                }
            }),
            _ => false,
        };
        inside || v.span().contains(&offset)
    }
    let root = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    in_table(root.get_ref(), offset, &mut path).then_some(path)
}
