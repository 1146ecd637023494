//! The compiled policy: every name resolved to an index, every code validated, every rule
//! carrying the path (`datasets.payments.cross_border`) by which errors, traces and the
//! decision log refer to it. Built only by `compile`, immutable afterwards.

use super::country::{Country, CountrySet};
use super::net::CidrTable;
use http::{HeaderName, Method};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Enforce denials, or only log them (`"enforced": false`) and forward anyway.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

/// What a request matching no dataset gets.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Unmatched {
    Deny,
    Allow,
}

/// How an address that nothing locates is treated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UnknownLocation {
    Deny,
    Foreign,
}

/// A transfer rule's verdict: `cross_border` and `third_party`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    Deny,
    Consent,
    Allow,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Deny => "deny",
            Rule::Consent => "consent",
            Rule::Allow => "allow",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    FirstParty,
    ThirdParty,
}

impl Relation {
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::FirstParty => "first_party",
            Relation::ThirdParty => "third_party",
        }
    }
}

/// A named set of countries; `name` is how the policy wrote it (`EU`, `CN`).
#[derive(Clone, Debug)]
pub struct Jurisdiction {
    pub name: Arc<str>,
    pub countries: CountrySet,
}

/// Named jurisdictions; every assigned country code is implicitly a jurisdiction of itself.
#[derive(Clone, Debug, Default)]
pub struct Jurisdictions {
    pub named: BTreeMap<String, CountrySet>,
}

impl Jurisdictions {
    /// A declared jurisdiction by name, else a country code as a jurisdiction of itself.
    pub fn resolve(&self, name: &str) -> Option<Jurisdiction> {
        if let Some(set) = self.named.get(name) {
            return Some(Jurisdiction {
                name: name.into(),
                countries: set.clone(),
            });
        }
        Country::parse(name).map(|c| Jurisdiction {
            name: c.as_str().into(),
            countries: CountrySet::of([c]),
        })
    }

    /// Whether `name` (a jurisdiction or a country code, as a consent's destination names
    /// it) contains `country`.
    pub fn covers(&self, name: &str, country: Country) -> bool {
        match self.named.get(name) {
            Some(set) => set.contains(country),
            None => Country::parse_shape(name) == Some(country),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NetworkOverride {
    pub cidr: IpNet,
    pub country: Country,
    pub name: Arc<str>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub scheme: Scheme,
    /// Host as written in the URL: a DNS name or an IP literal (without brackets).
    pub host: String,
    pub port: u16,
    /// The rule path, `upstreams.NAME`.
    pub rule: Arc<str>,
    /// Extra trust anchors (PEM) for an `https` upstream, besides the platform's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate to present to an `https` upstream (mTLS to storage).
    pub client_cert: Option<ClientCert>,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Recipient {
    pub id: Arc<str>,
    pub relation: Relation,
    pub country: Option<Country>,
    pub identities: Vec<String>,
    pub networks: Vec<IpNet>,
}

/// Where a dataset's data subject is named in a request.
#[derive(Clone, Debug)]
pub enum SubjectSource {
    /// 1-based segment of the normalised path.
    PathSegment(usize),
    Header(HeaderName),
    Query(String),
}

/// Rule paths of one dataset, precomputed so that decisions borrow them.
#[derive(Clone, Debug)]
pub struct DatasetRules {
    pub matcher: Arc<str>,
    pub upstream: Arc<str>,
    pub home: Arc<str>,
    pub cross_border: Arc<str>,
    pub third_party: Arc<str>,
    pub subject: Arc<str>,
    pub egress: Arc<str>,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub name: Arc<str>,
    /// Lower-case host without port; `*.example.com` matches any sub-domain.
    pub host: Option<String>,
    pub path_prefix: String,
    pub methods: Option<Vec<Method>>,
    pub upstream: usize,
    pub category: Arc<str>,
    pub subject: Option<SubjectSource>,
    /// A dataset of bulk objects (exports, feeds): each record names its own subject, and
    /// leaves only with that subject's consent. Never set together with `subject`.
    pub records: Option<Records>,
    pub home: Jurisdiction,
    pub resident: bool,
    pub cross_border: Rule,
    pub third_party: Rule,
    pub egress_methods: Vec<Method>,
    /// `egress_methods` as bits (`method_bit`), read without touching the list.
    pub egress_mask: u16,
    pub mode: Mode,
    pub rules: DatasetRules,
}

impl Dataset {
    pub fn is_egress(&self, method: &Method) -> bool {
        match method_bit(method) {
            Some(bit) => self.egress_mask & bit != 0,
            None => self.egress_methods.iter().any(|m| m == method),
        }
    }
}

/// How a bulk object's records are read: their format and the field naming each record's
/// data subject (checked by the compiler), and the rule path that declared them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Records {
    pub spec: crate::bulk::RecordsSpec,
    /// `datasets.NAME.records`.
    pub rule: Arc<str>,
}

/// A bit per standard method, for method sets held as masks.
pub fn method_bit(m: &Method) -> Option<u16> {
    let i = match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => return None,
    };
    Some(1 << i)
}

/// Where consents come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsentStore {
    /// No registry configured: no consent exists, so every transfer that needs one is refused.
    None,
    Sqlite(PathBuf),
    Postgres(String),
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ConsentSettings {
    pub store: ConsentStore,
    pub accept_methods: Vec<String>,
    pub purpose_header: HeaderName,
    pub max_staleness: Duration,
    /// Database stores: the byte budget of the sidecar's cache of subjects (SPEC 4.1).
    pub cache_max_bytes: usize,
    /// Database stores: how long a request waits for a cache miss to be answered.
    pub lookup_timeout: Duration,
    /// Database stores: hold the whole registry in memory instead of a cache.
    pub preload: bool,
    /// PostgreSQL: a read replica for cache misses (writes and the change feed use `store`).
    pub read_url: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    Write,
    Fsync,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OnFailure {
    Deny,
    Allow,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub target: LogTarget,
    pub durability: Durability,
    pub on_failure: OnFailure,
    pub signing_key: Option<PathBuf>,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    pub rotate_bytes: u64,
    pub pseudonymize: bool,
    pub mask_headers: Vec<HeaderName>,
    /// The chain's name (`[log] instance`, default the host name): every record carries it,
    /// and shipped files are kept under it.
    pub instance: Arc<str>,
    /// `[log] instance` was written in the policy (else it is the host name, which changes
    /// with every replaced container or pod).
    pub instance_given: bool,
    /// Seal (rotate) the active file at least this often, so that it ships at low traffic.
    pub rotate_interval: Option<Duration>,
    pub ship: Option<ShipSettings>,
}

/// `[log.ship]`: sealed files go to object storage (SPEC section 5.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipSettings {
    /// `s3://bucket/prefix/`, `gs://…`, `az://…` or `file:///dir/`.
    pub url: url::Url,
    /// An S3-compatible store's own endpoint (`http://10.20.0.9:9000`).
    pub endpoint: Option<url::Url>,
    pub region: Option<String>,
    pub credentials: ShipCredentials,
    /// Sealed files kept locally until their upload is confirmed; beyond, the log fails.
    pub spool_max_bytes: u64,
}

/// `[policy.source]`: the signed bundle a sidecar's rules come from, and how it is fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySource {
    pub url: SourceUrl,
    /// An S3-compatible store's own endpoint (`http://10.20.0.9:9000`).
    pub endpoint: Option<url::Url>,
    pub region: Option<String>,
    pub credentials: ShipCredentials,
    /// The public key (SPKI PEM) of the only signer whose bundles are accepted.
    pub key: PathBuf,
    pub poll_interval: Duration,
    /// Where the last verified bundle is kept, so that a restart while the source is
    /// unreachable comes up on it.
    pub cache: PathBuf,
}

/// Where a bundle is fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceUrl {
    /// `s3://bucket/key`, through the object store client the log shipping uses.
    S3(url::Url),
    /// `https://…` (or `http://…`: the signature, not the transport, makes a bundle trusted).
    Http(url::Url),
    /// `file:PATH`: a file on the sidecar's volume (relative paths from the working folder).
    File(PathBuf),
}

impl std::fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceUrl::S3(u) | SourceUrl::Http(u) => f.write_str(u.as_str()),
            SourceUrl::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShipCredentials {
    /// The store's standard environment variables (`AWS_ACCESS_KEY_ID`, …).
    Env,
    /// An AWS-style credentials file (`[default]`, `aws_access_key_id = …`).
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout: Duration,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    pub resolve_interval: Duration,
    pub upstream_idle_per_address: usize,
    pub workers: Option<usize>,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/2 streams one client connection may have open at once.
    pub max_concurrent_streams: u32,
}

#[derive(Clone, Debug)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
}

/// `[tls]`: terminate TLS on the data listener; with `client_ca`, require client
/// certificates (mTLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Dataset lookup by path prefix: one hash probe per distinct prefix length, longest first,
/// skipping the lengths at which no prefix ends with the byte the path has there.
#[derive(Clone, Debug, Default)]
pub struct DatasetIndex {
    /// Distinct prefix lengths, longest first.
    pub(crate) lengths: Vec<usize>,
    /// For each of `lengths`, the set of last bytes of the prefixes of that length (a bit
    /// per byte value). A path whose byte there is not in the set cannot match at that
    /// length: with thousands of datasets the probe it saves is a cache miss.
    pub(crate) last_bytes: Vec<[u64; 4]>,
    /// Prefix -> datasets with that prefix, most specific (host, then methods) first, then
    /// file order.
    pub(crate) by_prefix: FastMap<String, Vec<usize>>,
}

impl DatasetIndex {
    /// Whether a prefix of length `lengths[k]` may end with byte `b`.
    pub(crate) fn may_end_with(&self, k: usize, b: u8) -> bool {
        self.last_bytes[k][usize::from(b / 64)] & (1 << (b % 64)) != 0
    }
}

#[derive(Debug)]
pub struct Policy {
    pub name: String,
    /// `sha256:` over every source file, in load order.
    pub hash: Arc<str>,
    pub sources: Vec<PathBuf>,
    pub home: Jurisdiction,
    pub mode: Mode,
    pub unmatched: Unmatched,
    /// Where requests matching no dataset go when `unmatched = "allow"`.
    pub unmatched_upstream: Option<usize>,
    pub unknown_location: UnknownLocation,
    pub proxy: ProxySettings,
    pub trusted_proxies: CidrTable<()>,
    pub jurisdictions: Jurisdictions,
    pub geo_database: Option<PathBuf>,
    pub networks: Vec<NetworkOverride>,
    pub upstreams: Vec<Upstream>,
    pub recipients: Vec<Recipient>,
    pub datasets: Vec<Dataset>,
    pub consent: ConsentSettings,
    pub log: LogSettings,
    pub admin: AdminSettings,
    pub tls: Option<TlsSettings>,
    /// `[policy.source]`: the rules come from a signed bundle fetched from there.
    pub source: Option<PolicySource>,
    /// The revision of the bundle the rules came from (`None`: a policy read whole from disk).
    pub revision: Option<u64>,
    pub(crate) recipients_by_identity: FastMap<String, usize>,
    pub(crate) recipients_by_network: CidrTable<usize>,
    pub(crate) dataset_index: DatasetIndex,
}

impl Policy {
    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| &*d.name == name)
    }

    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }
}
