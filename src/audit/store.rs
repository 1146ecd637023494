//! Object storage for shipped decision logs: opening a store named by a URL (`s3://`,
//! `gs://`, `az://`, `file://`) with the `object_store` crate, the names shipped files get,
//! and listing a location that holds the logs of many instances.
//!
//! Layout: `PREFIX/INSTANCE/FIRSTSEQ-LASTSEQ-UTCTIME.jsonl.zst`, the sequence numbers
//! zero-padded to 20 digits so that names list in chain order, as rotated files do on disk.

use crate::policy::model::ShipCredentials;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

const SEQ_DIGITS: usize = 20;
/// `YYYYMMDDTHHMMSSZ`.
const TIME_LEN: usize = 16;
pub const SUFFIX: &str = ".jsonl.zst";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{url}: {why}")]
    Open { url: String, why: String },
    #[error("{url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("cannot read credentials file {}: {why}", path.display())]
    Credentials { path: PathBuf, why: String },
}

/// How to reach a store besides its URL.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// An S3-compatible store's endpoint (`http://10.20.0.9:9000`); path-style requests.
    pub endpoint: Option<Url>,
    pub region: Option<String>,
    /// `None`: the store's standard environment variables.
    pub credentials_file: Option<PathBuf>,
}

impl StoreOptions {
    pub fn new(endpoint: Option<Url>, region: Option<String>, creds: &ShipCredentials) -> Self {
        StoreOptions {
            endpoint,
            region,
            credentials_file: match creds {
                ShipCredentials::Env => None,
                ShipCredentials::File(p) => Some(p.clone()),
            },
        }
    }
}

/// A store and the prefix under which instances keep their files.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: ObjectPath,
    /// The URL as given, for messages.
    pub url: String,
    /// The host and port every request goes to; `None` for a local folder.
    pub host: Option<(String, u16)>,
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Whether `s` names object storage rather than a local path.
pub fn is_url(s: &str) -> bool {
    ["s3://", "gs://", "az://", "file://"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// Opens the store `url` names. Nothing is contacted yet.
pub fn open(url: &Url, opts: &StoreOptions) -> Result<Location, StoreError> {
    let fail = |why: String| open_error(url, why);
    if url.scheme() != "s3" && opts.credentials_file.is_some() {
        return Err(only_s3(url, "a credentials file"));
    }
    // The host every request goes to is read back from the configured builder, after the
    // environment (`AWS_ENDPOINT_URL`, `AZURE_STORAGE_ENDPOINT`, …) had its say, so that the
    // address located is the one the uploads reach.
    let (store, prefix, host): Opened = match url.scheme() {
        "s3" => open_s3(url, opts)?,
        "gs" => open_gs(url, opts)?,
        "az" => open_az(url, opts)?,
        "file" => open_file(url, opts)?,
        other => return Err(fail(format!("scheme {other}: is not s3, gs, az or file"))),
    };
    let host = match host {
        None => None,
        Some(endpoint) => {
            let u = Url::parse(&endpoint)
                .map_err(|e| fail(format!("the store's endpoint {endpoint} is not a URL: {e}")))?;
            let h = u
                .host_str()
                .ok_or_else(|| fail(format!("the store's endpoint {endpoint} has no host")))?;
            Some((
                h.trim_matches(['[', ']']).to_string(),
                u.port_or_known_default().unwrap_or(443),
            ))
        }
    };
    Ok(Location {
        store,
        prefix: ObjectPath::from(prefix.trim_matches('/')),
        url: url.to_string(),
        host,
    })
}

/// A store, the prefix its URL names, and the endpoint every request goes to (`None` for a
/// local folder).
type Opened = (Arc<dyn ObjectStore>, String, Option<String>);

fn open_error(url: &Url, why: String) -> StoreError {
    StoreError::Open {
        url: url.to_string(),
        why,
    }
}

/// An option given for a store that does not take it.
fn only_s3(url: &Url, what: &str) -> StoreError {
    open_error(
        url,
        format!("{what} applies to s3:// stores only (the others take their standard variables)"),
    )
}

/// The bucket or container the URL names.
fn bucket(url: &Url) -> Result<String, StoreError> {
    url.host_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .ok_or_else(|| open_error(url, "no bucket or container name after the scheme".into()))
}

fn open_s3(url: &Url, opts: &StoreOptions) -> Result<Opened, StoreError> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let mut b = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket(url)?)
        .with_s3_express(false)
        .with_retry(retry())
        .with_client_options(client_options());
    if let Some(region) = &opts.region {
        b = b.with_region(region);
    }
    if let Some(e) = &opts.endpoint {
        let e = e.as_str().trim_end_matches('/');
        b = b
            .with_endpoint(e)
            // Else `AWS_ENDPOINT_URL_S3` would take precedence over it.
            .with_config(K::S3Endpoint, e)
            .with_allow_http(opts.endpoint.as_ref().is_some_and(|u| u.scheme() == "http"))
            .with_virtual_hosted_style_request(false);
    }
    if let Some(path) = &opts.credentials_file {
        let c = read_credentials(path)?;
        b = b
            .with_access_key_id(c.key_id)
            .with_secret_access_key(c.secret);
        if let Some(t) = c.token {
            b = b.with_token(t);
        }
    }
    let host = match b
        .get_config_value(&K::S3Endpoint)
        .or_else(|| b.get_config_value(&K::Endpoint))
    {
        Some(endpoint) => endpoint,
        None => {
            let region = b
                .get_config_value(&K::Region)
                .unwrap_or_else(|| "us-east-1".into());
            let virtual_hosted = b
                .get_config_value(&K::VirtualHostedStyleRequest)
                .is_some_and(|v| v == "true");
            if virtual_hosted {
                format!("https://{}.s3.{region}.amazonaws.com", bucket(url)?)
            } else {
                format!("https://s3.{region}.amazonaws.com")
            }
        }
    };
    let store = b.build().map_err(|e| open_error(url, e.to_string()))?;
    Ok((Arc::new(store), url.path().to_string(), Some(host)))
}

fn open_gs(url: &Url, opts: &StoreOptions) -> Result<Opened, StoreError> {
    use object_store::gcp::GoogleConfigKey as K;
    let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket(url)?)
        .with_retry(retry())
        .with_client_options(client_options());
    if let Some(e) = &opts.endpoint {
        b = b.with_base_url(e.as_str().trim_end_matches('/'));
    }
    let host = b
        .get_config_value(&K::BaseUrl)
        .unwrap_or_else(|| "https://storage.googleapis.com".into());
    let store = b.build().map_err(|e| open_error(url, e.to_string()))?;
    Ok((Arc::new(store), url.path().to_string(), Some(host)))
}

fn open_az(url: &Url, opts: &StoreOptions) -> Result<Opened, StoreError> {
    use object_store::azure::AzureConfigKey as K;
    let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
        .with_container_name(bucket(url)?)
        .with_retry(retry())
        .with_client_options(client_options());
    if let Some(e) = &opts.endpoint {
        b = b
            .with_endpoint(e.as_str().trim_end_matches('/').to_string())
            .with_allow_http(e.scheme() == "http");
    }
    let host = match b.get_config_value(&K::Endpoint) {
        Some(endpoint) => endpoint,
        None if b
            .get_config_value(&K::UseEmulator)
            .is_some_and(|v| v == "true") =>
        {
            "http://127.0.0.1:10000".into()
        }
        None => match b.get_config_value(&K::AccountName) {
            Some(account) => format!("https://{account}.blob.core.windows.net"),
            None => {
                return Err(open_error(
                    url,
                    "no storage account: set AZURE_STORAGE_ACCOUNT_NAME, or give endpoint".into(),
                ));
            }
        },
    };
    let store = b.build().map_err(|e| open_error(url, e.to_string()))?;
    Ok((Arc::new(store), url.path().to_string(), Some(host)))
}

fn open_file(url: &Url, opts: &StoreOptions) -> Result<Opened, StoreError> {
    if opts.endpoint.is_some() {
        return Err(only_s3(url, "endpoint"));
    }
    let dir = url
        .to_file_path()
        .map_err(|()| open_error(url, "not a local folder".into()))?;
    std::fs::create_dir_all(&dir).map_err(|e| open_error(url, e.to_string()))?;
    // Rooted at `/` with the folder as the prefix, so that the folder's own name is known (a
    // location may be one instance's folder).
    let fs = object_store::local::LocalFileSystem::new();
    Ok((Arc::new(fs), dir.to_string_lossy().into_owned(), None))
}

/// A few quick retries inside a request: the shipper retries whole uploads with its own
/// back-off, and must learn within seconds that a store is down (the library's default keeps
/// retrying for three minutes).
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..object_store::RetryConfig::default()
    }
}

fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// An AWS-style credentials file: the `[default]` profile, or `AWS_PROFILE`'s.
fn read_credentials(path: &std::path::Path) -> Result<Credentials, StoreError> {
    let fail = |why: String| StoreError::Credentials {
        path: path.into(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut in_profile = false;
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
        } else if in_profile && let Some((k, v)) = line.split_once('=') {
            values.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let mut take = |k: &str| values.remove(k);
    match (take("aws_access_key_id"), take("aws_secret_access_key")) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: take("aws_session_token"),
        }),
        _ => Err(fail(format!(
            "profile [{profile}] has no aws_access_key_id and aws_secret_access_key"
        ))),
    }
}

/// The name of a shipped file: the records it holds and when it was sealed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentName {
    pub first: u64,
    pub last: u64,
    /// `YYYYMMDDTHHMMSSZ`.
    pub sealed: String,
}

impl SegmentName {
    pub fn parse(name: &str) -> Option<SegmentName> {
        let base = name.strip_suffix(SUFFIX)?;
        let mut parts = base.splitn(3, '-');
        let (first, last, sealed) = (parts.next()?, parts.next()?, parts.next()?);
        let digits = |s: &str| s.len() == SEQ_DIGITS && s.bytes().all(|b| b.is_ascii_digit());
        let time = sealed.len() == TIME_LEN
            && sealed.as_bytes()[8] == b'T'
            && sealed.ends_with('Z')
            && sealed.bytes().filter(u8::is_ascii_digit).count() == TIME_LEN - 2;
        if !(digits(first) && digits(last) && time) {
            return None;
        }
        Some(SegmentName {
            first: first.parse().ok()?,
            last: last.parse().ok()?,
            sealed: sealed.to_string(),
        })
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:0w$}-{:0w$}-{}{SUFFIX}",
            self.first,
            self.last,
            self.sealed,
            w = SEQ_DIGITS
        )
    }
}

/// One shipped file in a store.
#[derive(Clone, Debug)]
pub struct Segment {
    pub name: SegmentName,
    pub path: ObjectPath,
    pub size: u64,
}

/// What a location holds: each instance's segments in chain order, and objects under the
/// prefix that are not shipped files (reported, never read). A location may be a fleet's
/// prefix (`PREFIX/`, instances below it) or one instance's folder (`PREFIX/INSTANCE/`).
#[derive(Debug, Default)]
pub struct Listing {
    pub instances: BTreeMap<String, Vec<Segment>>,
    pub strangers: Vec<ObjectPath>,
}

/// Where an instance's files go: `PREFIX/INSTANCE`.
pub fn instance_prefix(loc: &Location, instance: &str) -> ObjectPath {
    loc.prefix.clone().join(instance)
}

/// Lists every instance under the location's prefix.
pub async fn list(loc: &Location) -> Result<Listing, StoreError> {
    let prefix = (!loc.prefix.as_ref().is_empty()).then_some(&loc.prefix);
    let objects: Vec<object_store::ObjectMeta> = loc
        .store
        .list(prefix)
        .try_collect()
        .await
        .map_err(|source| StoreError::Store {
            url: loc.url.clone(),
            source,
        })?;
    let mut listing = Listing::default();
    let skip = prefix.map_or(0, |p| p.parts().count());
    for meta in objects {
        let parts: Vec<_> = meta.location.parts().skip(skip).collect();
        let segment = match parts.as_slice() {
            [instance, file] => {
                SegmentName::parse(file.as_ref()).map(|name| (instance.as_ref().to_string(), name))
            }
            // The location is one instance's folder: the prefix's last part names it.
            [file] => SegmentName::parse(file.as_ref()).map(|name| {
                let instance = loc.prefix.parts().next_back();
                (
                    instance.map_or_else(String::new, |p| p.as_ref().to_string()),
                    name,
                )
            }),
            _ => None,
        };
        match segment {
            Some((instance, name)) => {
                listing
                    .instances
                    .entry(instance)
                    .or_default()
                    .push(Segment {
                        name,
                        path: meta.location,
                        size: meta.size,
                    })
            }
            None => listing.strangers.push(meta.location),
        }
    }
    for segments in listing.instances.values_mut() {
        segments.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(listing)
}

/// `s3://bucket/prefix/INSTANCE/FILE` for an object under the location, for messages.
pub fn object_url(loc: &Location, path: &ObjectPath) -> String {
    let rel = path
        .as_ref()
        .strip_prefix(loc.prefix.as_ref())
        .unwrap_or(path.as_ref())
        .trim_start_matches('/');
    format!("{}/{rel}", loc.url.trim_end_matches('/'))
}

/// Reads one object whole (a sealed file, bounded by `rotate_bytes`) and decompresses it.
pub async fn fetch(loc: &Location, path: &ObjectPath) -> Result<Vec<u8>, StoreError> {
    let err = |source| StoreError::Store {
        url: object_url(loc, path),
        source,
    };
    let bytes = loc
        .store
        .get(path)
        .await
        .map_err(err)?
        .bytes()
        .await
        .map_err(err)?;
    zstd::decode_all(bytes.as_ref()).map_err(|e| StoreError::Open {
        url: object_url(loc, path),
        why: format!("not a zstd stream: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort_in_chain_order() {
        let a = SegmentName {
            first: 9,
            last: 1200,
            sealed: "20261128T043153Z".into(),
        };
        let text = a.to_string();
        assert_eq!(
            text,
            "00000000000000000009-00000000000000001200-20261128T043153Z.jsonl.zst"
        );
        assert_eq!(SegmentName::parse(&text), Some(a.clone()));
        let b = SegmentName {
            first: 1201,
            last: 1300,
            sealed: "20251128T043153Z".into(),
        };
        assert!(text < b.to_string(), "an earlier clock still sorts by seq");
        for bad in [
            "9-1200-20261128T043153Z.jsonl.zst",
            "00000000000000000009-00000000000000001200-20261128T043153Z.jsonl",
            "00000000000000000009-00000000000000001200-2026112XT043153Z.jsonl.zst",
            "notes.txt",
        ] {
            assert_eq!(SegmentName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_credentials_file_gives_its_default_profile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "[other]\naws_access_key_id = X\n[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
        )
        .unwrap();
        let c = read_credentials(&path).unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str()), ("AK", "SK"));
        std::fs::write(&path, "[default]\naws_access_key_id = AK\n").unwrap();
        let err = read_credentials(&path).err().unwrap().to_string();
        assert!(
            err.contains("no aws_access_key_id and aws_secret_access_key"),
            "{err}"
        );
    }
}
