//! Property tests for the parsers that run in `cargo test` on a stable toolchain: a seeded
//! generator feeds thousands of inputs through the functions that the cargo-fuzz targets in
//! `fuzz/` exercise, and asserts the same invariants; then every fuzz target runs whole
//! (its fixture and its body, as the fuzzer runs it) on its seeds and generated inputs. Set
//! `PROPERTY_SEED` to explore other inputs; the default seed keeps every run identical.

#[path = "../support/invariants.rs"]
mod invariants;

use http::{HeaderMap, HeaderName, HeaderValue};
use invariants::*;
use residency_proxy::audit::read::verify::verify;
use residency_proxy::policy::compile::from_str;
use residency_proxy::policy::forwarded::parse_xff_element;
use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::Once;

fn rng() -> fastrand::Rng {
    let seed = std::env::var("PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    fastrand::Rng::with_seed(seed)
}

/// Concatenates 0..`max` pieces drawn from `pieces`.
fn pieces(rng: &mut fastrand::Rng, pieces: &[&str], max: usize) -> String {
    (0..rng.usize(..=max))
        .map(|_| pieces[rng.usize(..pieces.len())])
        .collect()
}

/// A string of random bytes from the whole range, read as UTF-8 with replacement.
fn noise(rng: &mut fastrand::Rng, max: usize) -> String {
    let bytes: Vec<u8> = (0..rng.usize(..=max)).map(|_| rng.u8(..)).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------
// 1. Path normalisation

const PATH_PIECES: &[&str] = &[
    "/", "/", "/", "//", "a", "b", "xyz", "payments", ".", ".", "..", "..", "...", ".a", "%2e",
    "%2E", "%2f", "%2F", "%5c", "%5C", "%00", "%41", "%61", "%7e", "%7E", "%2d", "%5f", "%30",
    "%25", "%20", "%3a", "%3A", "%c3%a9", "%C3", "%a9", "%ff", "%zz", "%4", "%", "é", "漢", "~",
    "-", "_", "\\", "\0", ";", "=", "@", ":", "+", " ", "?",
];

#[test]
fn normalize_upholds_its_invariants_on_generated_paths() {
    let mut rng = rng();
    let mut accepted = 0;
    for case in 0..20_000 {
        let raw = match case % 10 {
            0 => noise(&mut rng, 24),
            1 => format!("/{}", noise(&mut rng, 16)),
            2 => pieces(&mut rng, PATH_PIECES, 12),
            _ => format!("/{}", pieces(&mut rng, PATH_PIECES, 12)),
        };
        if check_normalize(&raw) {
            accepted += 1;
        }
    }
    // The generator must reach the interesting side too, or the invariants prove nothing.
    assert!(accepted > 5_000, "only {accepted} paths were accepted");
}

// ---------------------------------------------------------------------------------------
// 2. Forwarding headers

const XFF_PIECES: &[&str] = &[
    "1.1.1.1",
    "203.0.113.9",
    "10.2.2.2",
    "10.0.0.1:8080",
    "::1",
    "[::1]",
    "[2001:db8::1]:4711",
    "[2001:db8::1]:99999",
    "::ffff:10.1.1.1",
    "::ffff:198.51.100.7",
    "for=",
    "For=",
    "\"",
    ";",
    ",",
    ", ",
    " ",
    "proto=http",
    "by=10.0.0.1",
    "unknown",
    "_hidden",
    "[",
    "]",
    ":",
    "=",
    "1.2.3.4:",
    "256.1.1.1",
    "é",
    "\u{ff}",
    "\t",
];

const ADDRESSES: &[&str] = &[
    "203.0.113.9",
    "198.51.100.7:443",
    "10.2.2.2",
    "10.0.0.1:8080",
    "2001:db8::1",
    "[2001:db8::1]:4711",
    "[2001:db8:ffff::2]",
    "::ffff:10.1.1.1",
    "::ffff:203.0.113.9",
];

/// A forwarding header value: usually a well-formed chain of addresses (some trusted, some
/// not), sometimes pieces and raw bytes; `None` when `http` would not accept the bytes.
fn header_value(rng: &mut fastrand::Rng, forwarded: bool) -> Option<HeaderValue> {
    let mut bytes = if rng.u8(..4) == 0 {
        pieces(rng, XFF_PIECES, 8).into_bytes()
    } else {
        let elements: Vec<String> = (0..rng.usize(1..4))
            .map(|_| {
                let addr = if rng.u8(..10) == 0 {
                    XFF_PIECES[rng.usize(..XFF_PIECES.len())]
                } else {
                    ADDRESSES[rng.usize(..ADDRESSES.len())]
                };
                match (forwarded, rng.bool()) {
                    (false, _) => addr.to_string(),
                    (true, false) => format!("for={addr}"),
                    (true, true) => format!("proto=http;For=\"{addr}\""),
                }
            })
            .collect();
        elements.join(", ").into_bytes()
    };
    if rng.u8(..8) == 0 {
        bytes.extend((0..rng.usize(..6)).map(|_| rng.u8(..)));
    }
    HeaderValue::from_bytes(&bytes).ok()
}

#[test]
fn client_addr_never_panics_and_believes_only_trusted_peers() {
    let mut rng = rng();
    let trusted = trusted_proxies();
    let peers: Vec<IpAddr> = PEERS.iter().map(|s| s.parse().unwrap()).collect();
    let names = ["x-forwarded-for", "forwarded", "x-real-ip"];
    let mut from_headers = 0;
    for _ in 0..20_000 {
        let mut headers = HeaderMap::new();
        for _ in 0..rng.usize(..4) {
            let name = names[rng.usize(..names.len())];
            if let Some(v) = header_value(&mut rng, name == "forwarded") {
                headers.append(HeaderName::from_static(name), v);
            }
        }
        let peer = peers[rng.usize(..peers.len())];
        if check_client_addr(peer, &headers, &trusted) {
            from_headers += 1;
        }
        parse_xff_element(&noise(&mut rng, 12));
    }
    assert!(
        from_headers > 500,
        "only {from_headers} clients came from headers"
    );
}

#[test]
fn xff_elements_round_trip_every_address_form() {
    let mut rng = rng();
    for _ in 0..5_000 {
        let ip: IpAddr = if rng.bool() {
            IpAddr::from(rng.u32(..).to_be_bytes())
        } else {
            IpAddr::from(rng.u128(..).to_be_bytes())
        };
        let ip = ip.to_canonical();
        let port = rng.u16(..);
        let forms = match ip {
            IpAddr::V4(_) => vec![format!("{ip}"), format!(" {ip}:{port} ")],
            IpAddr::V6(_) => vec![format!("{ip}"), format!("[{ip}]"), format!("[{ip}]:{port}")],
        };
        for f in forms {
            assert_eq!(parse_xff_element(&f), Some(ip), "{f:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Policy parsing

const DEMO: &str = include_str!("../../policies/demo.toml");

const TOML_PIECES: &[&str] = &[
    "\n",
    "\n",
    "\n[policy]\n",
    "\n[proxy]\n",
    "\n[jurisdictions]\n",
    "\n[log]\n",
    "\n[consent]\n",
    "\n[tls]\n",
    "\n[[datasets]]\n",
    "\n[[upstreams]]\n",
    "\n[[recipients]]\n",
    "\n[[networks]]\n",
    "\n[datasets]\n",
    "\n[policy.home]\n",
    "include = [\"a.toml\", \"b.toml\"]\n",
    "include = 3\n",
    "name = \"x\"\n",
    "name = \"\"\n",
    "name = 7\n",
    "home = \"UK\"\n",
    "home = \"EU\"\n",
    "EU = [\"FR\", \"UK\"]\n",
    "CN = []\n",
    "mode = \"audit\"\n",
    "mode = [1, \"a\"]\n",
    "url = \"http://[::1]:99999/x?y\"\n",
    "url = \"https://\"\n",
    "upstream = \"cn-store\"\n",
    "category = \"User..Fin\"\n",
    "match = { path_prefix = \"/a/../b\" }\n",
    "match = { path_prefix = \"\" , host = \"*.*\", methods = [\"get\", \"\"] }\n",
    "subject = { path_segment = -9223372036854775808 }\n",
    "subject = { path_segment = 9223372036854775807, header = \"\" }\n",
    "subject = { query = \"\" }\n",
    "identities = [\"*\"]\n",
    "networks = [\"::/0\", \"0.0.0.0/0\", \"1.2.3.4/99\"]\n",
    "trusted_proxies = [\"\"]\n",
    "cidr = \"10.0.0.0/8\"\n",
    "country = \"zz\"\n",
    "checkpoint_every = 0\n",
    "checkpoint_every = 9223372036854775807\n",
    "checkpoint_every = -1\n",
    "checkpoint_every = 1e400\n",
    "rotate_bytes = 99999999999999999999999\n",
    "max_header_bytes = 0\n",
    "workers = 0\n",
    "connect_timeout = \"18446744073709551615h\"\n",
    "connect_timeout = \"99999999999999999999s\"\n",
    "drain_timeout = \"0s\"\n",
    "checkpoint_interval = \"307445734561825861m\"\n",
    "max_staleness = \"18446744073709551615h\"\n",
    "accept_methods = []\n",
    "accept_methods = [\"implied\", \"telepathy\"]\n",
    "purpose_header = \"bad header\"\n",
    "mask_headers = [\"\", \"é\"]\n",
    "pseudonymize = \"yes\"\n",
    "resident = 1979-05-27T07:32:00Z\n",
    "listen = \"localhost\"\n",
    "cert = \"c\"\n",
    "colour = \"blue\"\n",
    "a.b.c = 1\n",
    "\"quoted key\" = nan\n",
    "x = inf\n",
    "x = '''\nmulti\n'''\n",
    "x = \"\\u00e9\\u202e\"\n",
    "x = [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]\n",
    "x = {a={b={c={d={}}}}}\n",
    "é = \"é\"\n",
    "= 1\n",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    ",",
    "#",
    "=",
];

/// What a key holds, so that most generated values have the right TOML type and reach
/// compilation instead of stopping at deserialisation.
#[derive(Copy, Clone)]
enum Kind {
    Str,
    Int,
    Bool,
    List,
    Table,
}
use Kind::*;

/// Every table of the schema with its keys (`[[name]]` for arrays of tables).
const SCHEMA: &[(&str, &[(&str, Kind)])] = &[
    (
        "[policy]",
        &[
            ("name", Str),
            ("home", Str),
            ("mode", Str),
            ("unmatched", Str),
            ("unknown_location", Str),
            ("unmatched_upstream", Str),
        ],
    ),
    (
        "[proxy]",
        &[
            ("listen", Str),
            ("trusted_proxies", List),
            ("max_header_bytes", Int),
            ("max_headers", Int),
            ("max_body_bytes", Int),
            ("header_read_timeout", Str),
            ("connect_timeout", Str),
            ("upstream_timeout", Str),
            ("idle_timeout", Str),
            ("max_connections", Int),
            ("drain_timeout", Str),
            ("resolve_interval", Str),
            ("upstream_idle_per_address", Int),
            ("workers", Int),
        ],
    ),
    (
        "[jurisdictions]",
        &[
            ("EU", List),
            ("UK", List),
            ("CN", List),
            ("x", List),
            ("\"\"", List),
        ],
    ),
    ("[geo]", &[("database", Str)]),
    (
        "[[networks]]",
        &[("cidr", Str), ("country", Str), ("name", Str)],
    ),
    ("[[upstreams]]", &[("name", Str), ("url", Str)]),
    (
        "[[recipients]]",
        &[
            ("id", Str),
            ("relation", Str),
            ("country", Str),
            ("identities", List),
            ("networks", List),
        ],
    ),
    (
        "[[datasets]]",
        &[
            ("name", Str),
            ("match", Table),
            ("upstream", Str),
            ("category", Str),
            ("subject", Table),
            ("home", Str),
            ("resident", Bool),
            ("cross_border", Str),
            ("third_party", Str),
            ("egress_methods", List),
            ("mode", Str),
        ],
    ),
    (
        "[consent]",
        &[
            ("store", Str),
            ("accept_methods", List),
            ("purpose_header", Str),
            ("max_staleness", Str),
        ],
    ),
    (
        "[log]",
        &[
            ("path", Str),
            ("durability", Str),
            ("on_failure", Str),
            ("signing_key", Str),
            ("checkpoint_every", Int),
            ("checkpoint_interval", Str),
            ("rotate_bytes", Int),
            ("pseudonymize", Bool),
            ("mask_headers", List),
        ],
    ),
    ("[admin]", &[("listen", Str), ("token_file", Str)]),
    ("[tls]", &[("cert", Str), ("key", Str), ("client_ca", Str)]),
];

const STRINGS: &[&str] = &[
    "\"x\"",
    "\"\"",
    "\"CN\"",
    "\"cn\"",
    "\"UK\"",
    "\"EU\"",
    "\"x\"",
    "\"enforce\"",
    "\"audit\"",
    "\"deny\"",
    "\"allow\"",
    "\"consent\"",
    "\"foreign\"",
    "\"first_party\"",
    "\"third_party\"",
    "\"write\"",
    "\"fsync\"",
    "\"-\"",
    "\"10.0.0.0/8\"",
    "\"1.2.3.4/99\"",
    "\"::/0\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:99999\"",
    "\"http://127.0.0.1:9\"",
    "\"https://h/x?y\"",
    "\"ftp://x\"",
    "\"sqlite:\"",
    "\"file:c.jsonl\"",
    "\"user.financial\"",
    "\"X-Purpose\"",
    "\"bad header\"",
    "\"5s\"",
    "\"0ms\"",
    "\"18446744073709551615h\"",
    "\"307445734561825861m\"",
    "\"18446744073709551615s\"",
    "\"99999999999999999999s\"",
    "\"1.5s\"",
    "\"-1s\"",
    "\"é\\u202e\"",
    "\"*\"",
];
const INTS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "1024",
    "9223372036854775807",
    "-9223372036854775808",
];
const LISTS: &[&str] = &[
    "[]",
    "[\"GET\", \"get\", \"\"]",
    "[\"FR\", \"UK\"]",
    "[\"CN\"]",
    "[\"explicit\"]",
    "[\"pre_ticked\", \"telepathy\"]",
    "[\"spiffe://x/*\"]",
    "[\"spiffe://x/y\"]",
    "[\"10.0.0.0/8\", \"10.0.0.0/8\"]",
    "[\"authorization\", \"é\"]",
];
const TABLES: &[&str] = &[
    "{}",
    "{ path_prefix = \"/a/\" }",
    "{ path_prefix = \"/a//\", host = \"*.*\", methods = [\"get\"] }",
    "{ path_prefix = \"a\", host = \"x.example\", methods = [\"GET\"] }",
    "{ path_segment = 0 }",
    "{ path_segment = 2 }",
    "{ path_segment = 2, header = \"X-S\" }",
    "{ header = \"bad header\" }",
    "{ query = \"\" }",
    "{ query = \"uid\" }",
    "{ colour = 1 }",
];
/// Values of no expected type.
const ODD: &[&str] = &[
    "1.5",
    "nan",
    "-inf",
    "true",
    "1979-05-27T07:32:00Z",
    "[1, \"a\"]",
    "{ a = [] }",
];

/// A document in the policy's shape with random keys and values: TOML that mostly reaches
/// compilation, with wrong values, huge numbers, duplicates, unknown keys and wrong types.
fn structured(rng: &mut fastrand::Rng) -> String {
    let mut doc = String::new();
    if rng.u8(..8) == 0 {
        doc.push_str("include = [\"a.toml\", \"b.toml\", \"c.toml\"]\n");
    }
    let mut tables = Vec::new();
    for _ in 0..rng.usize(..10) {
        let (table, keys) = SCHEMA[rng.usize(..SCHEMA.len())];
        // A table or key defined twice is a TOML error, and so is a missing or mistyped
        // value to serde: each only now and then, so that most documents get compiled.
        if !table.starts_with("[[") && tables.contains(&table) && rng.u8(..40) != 0 {
            continue;
        }
        tables.push(table);
        doc.push_str(table);
        doc.push('\n');
        let mut used = Vec::new();
        let required = match (table, rng.u8(..40)) {
            (_, 0) => 0,
            ("[[networks]]" | "[[upstreams]]" | "[[recipients]]", _) => 2,
            ("[[datasets]]", _) => 4,
            _ => 0,
        };
        for i in 0..required + rng.usize(..4) {
            let (key, kind) = keys[if i < required {
                i
            } else {
                rng.usize(..keys.len())
            }];
            if used.contains(&key) && rng.u8(..40) != 0 {
                continue;
            }
            used.push(key);
            let key = if rng.u8(..20) == 0 { "colour" } else { key };
            let values = match (rng.u8(..60), kind) {
                (0, _) => ODD,
                (1, _) => STRINGS,
                (_, Str) => STRINGS,
                (_, Int) => INTS,
                (_, Bool) => &["true", "false"],
                (_, List) => LISTS,
                (_, Table) => TABLES,
            };
            let value = values[rng.usize(..values.len())];
            doc.push_str(&format!("{key} = {value}\n"));
        }
    }
    doc
}

/// Applies one random edit to a policy text.
fn mutate(rng: &mut fastrand::Rng, text: &mut String) {
    let at = |rng: &mut fastrand::Rng, t: &str| {
        let mut i = rng.usize(..=t.len());
        while !t.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match rng.u8(..5) {
        0 => {
            let a = at(rng, text);
            let b = at(rng, text);
            text.replace_range(a.min(b)..a.max(b).min(a.min(b) + 40), "");
        }
        1 | 2 => {
            let i = at(rng, text);
            text.insert_str(i, TOML_PIECES[rng.usize(..TOML_PIECES.len())]);
        }
        3 => {
            // Duplicate a line (duplicate keys and tables).
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let line = lines[rng.usize(..lines.len())].to_string();
                let i = at(rng, text);
                text.insert_str(i, &format!("\n{line}\n"));
            }
        }
        _ => {
            let i = at(rng, text);
            text.insert_str(i, &noise(rng, 4));
        }
    }
}

#[test]
fn policy_compilation_never_panics_and_every_diagnostic_says_something() {
    let mut rng = rng();
    assert!(from_str("demo.toml", DEMO).is_ok());
    let mut compiled = 0;
    for case in 0..2_400 {
        let text = match case % 6 {
            // Small documents built only from pieces: wrong types, huge numbers, junk.
            0 => pieces(&mut rng, TOML_PIECES, 30),
            1 => noise(&mut rng, 64),
            2 | 3 => structured(&mut rng),
            // The demo policy with a few edits: mostly valid TOML with one thing wrong.
            _ => {
                let mut t = DEMO.to_string();
                for _ in 0..rng.usize(1..=4) {
                    mutate(&mut rng, &mut t);
                }
                t
            }
        };
        if check_policy(&text) {
            compiled += 1;
        }
    }
    assert!(
        compiled > 450,
        "only {compiled} documents reached compilation"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Log verification

#[test]
fn a_written_log_changed_at_any_byte_never_verifies() {
    // The fuzz target's fixture: a log from the real writer, checked to verify as written.
    let target = without_hidden_panics("the verify_mutation fixture", VerifyMutation::new);
    let original = &target.log;
    let mut rng = rng();
    // Every position once: with a byte a forger would try first (a digit, dot or exponent
    // respelled, a letter's case flipped) where there is one, else a random byte; then
    // random bytes at random positions.
    let mut changes: Vec<(usize, u8)> = original
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let twins: &[u8] = match b {
                b'0'..=b'9' => b".eE-+0",
                b'.' | b'e' | b'E' => b"eE.",
                b'a'..=b'z' | b'A'..=b'Z' => &[b ^ 0x20],
                b':' | b',' => b" ",
                _ => &[rng.u8(..)],
            };
            (i, twins[rng.usize(..twins.len())])
        })
        .collect();
    changes.extend((0..300).map(|_| (rng.usize(..original.len()), rng.u8(..))));
    for (at, byte) in changes {
        target.check(at, byte);
    }
}

#[test]
fn verify_never_panics_on_arbitrary_contents() {
    let mut rng = rng();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("any.jsonl");
    let json_pieces: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "\"seq\":",
        "\"prev\":",
        "\"hash\":",
        "\"kind\":\"checkpoint\"",
        "1",
        "0",
        "-1",
        "1e400",
        "18446744073709551616",
        "1.5",
        "null",
        "true",
        "\"\"",
        "\"0000\"",
        ",",
        ":",
        "\n",
        "\n",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "é",
        "\u{ff}",
    ];
    for case in 0..3_000 {
        let text = match case % 3 {
            0 => noise(&mut rng, 200),
            _ => pieces(&mut rng, json_pieces, 40),
        };
        check_verify_any(text.as_bytes(), &path);
    }
    // Lines that pass every structural check and fail only on the hash.
    let zeros = "0".repeat(64);
    std::fs::write(
        &path,
        format!("{{\"seq\":1,\"prev\":\"{zeros}\",\"hash\":\"{zeros}\"}}\n"),
    )
    .unwrap();
    assert!(verify(&path).unwrap_err().why.contains("hash mismatch"));
}

// ---------------------------------------------------------------------------------------
// 5. The fuzz targets, whole

/// Runs `body` and fails if anything on this thread panicked meanwhile, even a panic that
/// was caught on the way (a tokio task's panic becomes a `JoinError` that nobody reads).
/// libFuzzer aborts on every panic, so without this a fixture could crash each fuzz run at
/// its first input and still pass here.
fn without_hidden_panics<R>(what: &str, body: impl FnOnce() -> R) -> R {
    thread_local! {
        /// The panics on this thread since `body` started; `None` outside `body`.
        static PANICS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = PANICS.try_with(|p| {
                if let Some(seen) = p.borrow_mut().as_mut() {
                    seen.push(info.to_string());
                }
            });
            previous(info);
        }));
    });
    PANICS.with(|p| *p.borrow_mut() = Some(Vec::new()));
    let out = body();
    let panics = PANICS.with(|p| p.take()).unwrap_or_default();
    assert!(
        panics.is_empty(),
        "{what}: a panic was caught on the way, which stops a fuzz run: {panics:#?}"
    );
    out
}

/// A generated input for a target: one of its seeds changed a little (bytes replaced,
/// inserted, removed, or two seeds spliced), or random bytes.
fn variant(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut input = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..=input.len());
        match rng.u8(..5) {
            0 => {
                let byte = rng.u8(..);
                if let Some(b) = input.get_mut(at) {
                    *b = byte;
                }
            }
            1 => {
                let bytes: Vec<u8> = (0..rng.usize(1..8)).map(|_| rng.u8(..)).collect();
                input.splice(at..at, bytes);
            }
            2 => {
                let end = (at + rng.usize(1..16)).min(input.len());
                input.drain(at..end);
            }
            3 => {
                let other = &seeds[rng.usize(..seeds.len())];
                let from = rng.usize(..=other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => input = (0..rng.usize(..64)).map(|_| rng.u8(..)).collect(),
        }
    }
    input
}

/// Runs target `T` as `cargo fuzz run` does, briefly: the fixture once, then the body on
/// every seed and on generated inputs.
fn fuzz_briefly<T: Target>(rng: &mut fastrand::Rng) {
    without_hidden_panics(T::NAME, || {
        let target = T::new();
        let seeds = T::seeds();
        assert!(!seeds.is_empty(), "{}: no seeds", T::NAME);
        for seed in &seeds {
            target.run(seed);
        }
        for _ in 0..300 {
            target.run(&variant(rng, &seeds));
        }
    });
}

/// One fuzz target: its name in `fuzz/Cargo.toml`, the type that holds its fixture and
/// body, and its brief run.
struct Entry {
    name: &'static str,
    type_name: &'static str,
    run: fn(&mut fastrand::Rng),
}

fn entry<T: Target>() -> Entry {
    let full = std::any::type_name::<T>();
    Entry {
        name: T::NAME,
        type_name: full.rsplit("::").next().unwrap_or(full),
        run: fuzz_briefly::<T>,
    }
}

/// Every fuzz target. A new one is a type implementing `Target` in
/// `tests/support/invariants.rs`, a file and a `[[bin]]` in `fuzz/`, and a line here.
fn fuzz_targets() -> Vec<Entry> {
    vec![
        entry::<NormalizePath>(),
        entry::<Forwarded>(),
        entry::<Policy>(),
        entry::<VerifyLog>(),
        entry::<VerifyMutation>(),
        entry::<BulkRecords>(),
        entry::<PolicyBundle>(),
    ]
}

#[test]
fn every_fuzz_target_runs_clean_on_its_seeds_and_generated_inputs() {
    let mut rng = rng();
    for target in fuzz_targets() {
        (target.run)(&mut rng);
    }
}

#[test]
fn every_fuzz_target_in_fuzz_cargo_toml_is_run_here() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest: toml::Table = std::fs::read_to_string(fuzz.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut bins: Vec<&str> = manifest["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    bins.sort_unstable();
    let mut files: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort_unstable();
    let targets = fuzz_targets();
    let mut here: Vec<&str> = targets.iter().map(|t| t.name).collect();
    here.sort_unstable();
    assert_eq!(
        bins, here,
        "the [[bin]]s of fuzz/Cargo.toml against fuzz_targets() here"
    );
    let expected: Vec<String> = here.iter().map(|n| format!("{n}.rs")).collect();
    assert_eq!(files, expected, "the files of fuzz/fuzz_targets/");
    // Each file must run the body that is tested here, not a copy of it.
    for t in &targets {
        let file = fuzz.join("fuzz_targets").join(format!("{}.rs", t.name));
        let text = std::fs::read_to_string(&file).unwrap();
        let call = format!("TARGET.get_or_init({}::new).run(data)", t.type_name);
        assert!(
            text.contains(&call),
            "{} does not call {call}",
            file.display()
        );
    }
}
