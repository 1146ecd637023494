//! `bundle build|verify|inspect`: signed policy bundles for a fleet. `build` compiles the
//! policy as a bundle's (a bundle that does not compile is never built) and signs it;
//! `verify` checks the signature and every hash against a public key; `inspect` shows what a
//! bundle says about itself.

use super::{CliResult, Exit, fail};
use crate::audit::keys::{self, SigningKey};
use crate::bundle::build::{BuildError, BuildOptions, build, default_builder};
use crate::bundle::{Bundle, BundleError, keep, parse};
use crate::policy::PolicyError;
use clap::Subcommand;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Compile POLICY as a bundle's policy and write it, the files it includes and optionally
    /// a geolocation database into one signed file.
    #[command(after_long_help = BUILD_HELP)]
    Build(BuildArgs),
    /// Check a bundle's signature against a public key, and every file against its hash.
    #[command(
        after_long_help = "Prints `BUNDLE: ok: …` and exits 0 when the bundle was signed by \
the key given and every file matches its SHA-256. Otherwise prints `BUNDLE: REASON: why` and exits \
1, REASON being one of unsigned, other_key (signed, by another key) and corrupt (not a bundle, \
truncated, a file that does not match its hash, named, or a manifest changed after signing)."
    )]
    Verify(VerifyArgs),
    /// Show what a bundle says about itself: revision, build time, builder, signer and each
    /// file with its size and hash.
    #[command(
        after_long_help = "Nothing is verified against a key (that is `bundle verify`), \
but each file is checked against its hash: exit 1 when one does not match, or when the file is \
not a bundle."
    )]
    Inspect(InspectArgs),
}

const BUILD_HELP: &str = "The policy is compiled first, exactly as `check --offline` compiles a \
policy, and as a bundle's: it carries the rules every sidecar shares ([policy] name, home, mode, \
unmatched, unknown_location, [jurisdictions], [geo], [[networks]], [[upstreams]], \
[[recipients]], [[datasets]]), and a table that belongs in a sidecar's own file ([proxy], \
[admin], [tls], [log], [consent], [policy.source]) is an error. Errors are printed as `check` \
prints them and nothing is written (exit 1).\n\n\
The bundle holds the policy and every file it includes, under their paths relative to the \
policy's folder (an include outside it is refused), and with --geo a MaxMind-format database, \
checked to open, which replaces [geo] database on every sidecar. Without --geo, a policy's \
[geo] database is read from each sidecar's own volume.\n\n\
The manifest names each file with its SHA-256, the revision, the build time, the builder and \
the signing key's fingerprint, and is signed with the Ed25519 key (`certs init` makes \
policy-signing.key). Sidecars refuse a bundle whose revision is not newer than the one they \
run, unless it was built with --allow-rollback. The revision defaults to the build time in \
seconds since 1970, which grows from build to build; a pipeline that numbers its builds can \
give --revision instead, and must then always give it.";

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The bundle's policy file.
    pub policy: PathBuf,
    /// A MaxMind-format database to carry as the policy's [geo] database.
    #[arg(long, value_name = "FILE")]
    pub geo: Option<PathBuf>,
    /// The Ed25519 private key (PKCS#8 PEM) that signs the bundle.
    #[arg(long, value_name = "KEY")]
    pub signing_key: PathBuf,
    /// Where to write the bundle (replaced whole, never left half-written).
    #[arg(short = 'o', long = "out", value_name = "BUNDLE")]
    pub out: PathBuf,
    /// The revision (default: the build time in seconds since 1970).
    #[arg(long, value_name = "N")]
    pub revision: Option<u64>,
    /// Let sidecars running a newer revision take this one (to roll back).
    #[arg(long)]
    pub allow_rollback: bool,
    /// Who built it (default: USER@HOST).
    #[arg(long, value_name = "NAME")]
    pub builder: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    pub bundle: PathBuf,
    /// The signer's public key (SPKI PEM, e.g. policy-signing.pub).
    #[arg(long, value_name = "PUB")]
    pub key: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    pub bundle: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BundleCommand) -> CliResult {
    match cmd {
        BundleCommand::Build(a) => run_build(a),
        BundleCommand::Verify(a) => run_verify(a),
        BundleCommand::Inspect(a) => run_inspect(a),
    }
}

fn run_build(a: BuildArgs) -> CliResult {
    let key = SigningKey::load(&a.signing_key)?;
    let built_at = jiff::Timestamp::now();
    let revision = match a.revision {
        Some(n) => n,
        None => u64::try_from(built_at.as_second())
            .map_err(|_| fail("the clock is before 1970: give --revision"))?,
    };
    let builder = a.builder.unwrap_or_else(default_builder);
    if builder.len() > 256 || builder.chars().any(char::is_control) {
        return Err(fail(format!(
            "--builder {builder:?}: at most 256 bytes without control characters"
        )));
    }
    let opts = BuildOptions {
        policy: &a.policy,
        geo: a.geo.as_deref(),
        signing_key: &key,
        revision,
        built_at,
        builder,
        allow_rollback: a.allow_rollback,
    };
    let built = match build(&opts) {
        Ok(b) => b,
        Err(BuildError::Policy(PolicyError::Invalid(diags))) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("{}: {} error(s)", a.policy.display(), diags.len());
            return Ok(Exit::Failed);
        }
        Err(BuildError::Policy(e)) => return Err(e.into()),
        Err(e @ (BuildError::Read { .. } | BuildError::GeoUnnamed { .. })) => {
            return Err(e.into());
        }
        Err(BuildError::Geo(e @ crate::geo::GeoError::Read { .. })) => return Err(e.into()),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(Exit::Failed);
        }
    };
    if a.geo.is_none()
        && let Some(db) = &built.policy.geo_database
    {
        eprintln!(
            "note: the bundle does not carry the geolocation database {}: each sidecar reads its own (give --geo FILE to carry one)",
            db.display()
        );
    }
    keep::write_atomic(&a.out, &built.bytes)
        .map_err(|e| fail(format!("cannot write {}: {e}", a.out.display())))?;
    let m = &built.manifest;
    let p = &built.policy;
    let geo = built
        .geo_label
        .as_deref()
        .map(|l| format!(", geolocation {l}"))
        .unwrap_or_default();
    println!(
        "{}: revision {}, policy \"{}\" ({} files, {} datasets, {} upstreams, {} recipients){geo}, signed by {}",
        a.out.display(),
        m.revision,
        p.name,
        m.files.len(),
        p.datasets,
        p.upstreams,
        p.recipients,
        m.signer
    );
    Ok(Exit::Ok)
}

fn read_bundle(path: &Path) -> Result<Vec<u8>, super::CliError> {
    std::fs::read(path).map_err(|e| fail(format!("cannot read bundle {}: {e}", path.display())))
}

/// Prints why `path` is refused, as `BUNDLE: REASON: why`.
fn refused(path: &Path, e: &BundleError) -> Exit {
    eprintln!("{}: {}: {e}", path.display(), e.reason());
    Exit::Failed
}

fn run_verify(a: VerifyArgs) -> CliResult {
    let key = keys::load_public_key(&a.key)?;
    let bytes = read_bundle(&a.bundle)?;
    let bundle = match parse(&bytes) {
        Ok(b) => b,
        Err(e) => return Ok(refused(&a.bundle, &e)),
    };
    if let Err(e) = bundle.verify(&key) {
        return Ok(refused(&a.bundle, &e));
    }
    let m = &bundle.manifest;
    println!(
        "{}: ok: revision {}, {} files, built {} by {}, signed by {}",
        a.bundle.display(),
        m.revision,
        m.files.len(),
        m.built_at,
        m.builder,
        m.signer
    );
    Ok(Exit::Ok)
}

/// `inspect --json`.
#[derive(Serialize)]
struct Inspected<'a> {
    revision: u64,
    built_at: jiff::Timestamp,
    builder: &'a str,
    signer: &'a str,
    signed: bool,
    allow_rollback: bool,
    policy: &'a str,
    geo: Option<&'a str>,
    files: Vec<InspectedFile<'a>>,
}

#[derive(Serialize)]
struct InspectedFile<'a> {
    path: &'a str,
    size: u64,
    sha256: &'a str,
    /// The bytes match the hash.
    intact: bool,
}

fn inspected<'a>(b: &'a Bundle<'_>) -> Inspected<'a> {
    let m = &b.manifest;
    Inspected {
        revision: m.revision,
        built_at: m.built_at,
        builder: &m.builder,
        signer: &m.signer,
        signed: b.is_signed(),
        allow_rollback: m.allow_rollback,
        policy: &m.policy,
        geo: m.geo.as_deref(),
        files: b
            .files()
            .map(|(f, bytes)| InspectedFile {
                path: &f.path,
                size: f.size,
                sha256: &f.sha256,
                intact: crate::bundle::format::sha256_hex(bytes) == f.sha256,
            })
            .collect(),
    }
}

fn run_inspect(a: InspectArgs) -> CliResult {
    let bytes = read_bundle(&a.bundle)?;
    let bundle = match parse(&bytes) {
        Ok(b) => b,
        Err(e) => return Ok(refused(&a.bundle, &e)),
    };
    let view = inspected(&bundle);
    let intact = view.files.iter().all(|f| f.intact);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        let signer = if view.signed {
            format!(
                "{} (not verified: `bundle verify --key` checks it)",
                view.signer
            )
        } else {
            "unsigned".into()
        };
        println!("revision     {}", view.revision);
        println!("built        {} by {}", view.built_at, view.builder);
        println!("signer       {signer}");
        println!(
            "rollback     {}",
            if view.allow_rollback {
                "allowed: sidecars running a newer revision take this one"
            } else {
                "not allowed"
            }
        );
        println!("policy       {}", view.policy);
        if let Some(geo) = view.geo {
            println!("geolocation  {geo}");
        }
        println!("files");
        let width = view.files.iter().map(|f| f.path.len()).max().unwrap_or(0);
        for f in &view.files {
            let flag = if f.intact {
                ""
            } else {
                "  DOES NOT MATCH ITS HASH"
            };
            println!(
                "  {:width$}  {:>12}  sha256:{}{flag}",
                f.path, f.size, f.sha256
            );
        }
    }
    if !intact {
        if let Err(e) = bundle.check_hashes() {
            eprintln!("{}: {}: {e}", a.bundle.display(), e.reason());
        }
        return Ok(Exit::Failed);
    }
    Ok(Exit::Ok)
}
