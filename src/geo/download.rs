//! One HTTP(S) GET for `geo update`: HTTP/1.1 over hyper's connection API, TLS with rustls
//! (aws-lc-rs) against the platform's trust anchors (`SSL_CERT_FILE` and `SSL_CERT_DIR` are
//! honoured), redirects followed (MaxMind answers a download with a redirect to its storage),
//! basic authentication sent only to the origin it was given for, and a body read whole up to
//! a limit.

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use url::Url;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;
/// To open a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// For the whole transfer: the largest databases are a few hundred MB.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// An account id and licence key (MaxMind), sent as HTTP basic authentication.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Why a source did not deliver its bytes.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// No answer: the name, the connection, TLS or the HTTP exchange failed.
    #[error("cannot download {url}: {why}")]
    Failed { url: String, why: String },
    /// An answer other than the file.
    #[error("{url} answered {status}{hint}")]
    Status {
        url: String,
        status: StatusCode,
        hint: &'static str,
    },
    /// The body stopped before the length the server announced.
    #[error("the download from {url} ended after {got} of {expected} bytes")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("the download from {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    /// A file given as the source could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// `url` as it may be shown: without a password in it, and with a `license_key` query
/// parameter (MaxMind's older download URLs) masked.
pub fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    if u.query_pairs().any(|(k, _)| k == "license_key") {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "license_key" {
                    "…".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// GETs `url`, following redirects, and returns the body (at most `limit` bytes). Basic
/// authentication (`auth`, else the URL's own user and password) goes to `url`'s origin only:
/// a redirect elsewhere (a storage bucket's signed URL) is followed without it.
pub async fn get(
    url: &Url,
    auth: Option<&Credentials>,
    limit: u64,
) -> Result<Vec<u8>, DownloadError> {
    let from_url = (!url.username().is_empty()).then(|| Credentials {
        user: percent_decoded(url.username()),
        password: percent_decoded(url.password().unwrap_or("")),
    });
    let auth = auth.cloned().or(from_url);
    let mut first = url.clone();
    let _ = first.set_username("");
    let _ = first.set_password(None);
    // A licence key in the query (MaxMind's legacy download URLs) is a credential too.
    let key_in_query = first.query_pairs().any(|(k, _)| k == "license_key");
    if (auth.is_some() || key_in_query) && first.scheme() == "http" && !is_loopback(&first) {
        return Err(DownloadError::Failed {
            url: shown(&first),
            why: "a licence key is not sent over plain http; use https".into(),
        });
    }
    let roots = Arc::new(platform_roots());
    let transfer = async {
        let mut current = first.clone();
        for _ in 0..=MAX_REDIRECTS {
            let auth = auth.as_ref().filter(|_| current.origin() == first.origin());
            let response = request(&current, auth, &roots).await?;
            let status = response.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                current = redirected(&current, &response)?;
                continue;
            }
            if !status.is_success() {
                return Err(DownloadError::Status {
                    url: shown(&current),
                    status,
                    hint: match status {
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if auth.is_some() => {
                            ": the account id and licence key were refused"
                        }
                        StatusCode::UNAUTHORIZED => {
                            ": it needs an account id and licence key (--account-id, --license-key)"
                        }
                        _ => "",
                    },
                });
            }
            return body(&current, response, limit).await;
        }
        Err(DownloadError::Failed {
            url: shown(&first),
            why: format!("more than {MAX_REDIRECTS} redirects"),
        })
    };
    tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
        .await
        .unwrap_or_else(|_| {
            Err(DownloadError::Failed {
                url: shown(&first),
                why: format!(
                    "not finished within {} minutes",
                    TRANSFER_TIMEOUT.as_secs() / 60
                ),
            })
        })
}

/// Where a redirect points; an https download is never continued over plain http.
fn redirected(
    current: &Url,
    response: &http::Response<hyper::body::Incoming>,
) -> Result<Url, DownloadError> {
    let fail = |why: String| DownloadError::Failed {
        url: shown(current),
        why,
    };
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| {
            fail(format!(
                "a {} redirect without a Location",
                response.status()
            ))
        })?;
    let next = current.join(location).map_err(|e| {
        fail(format!(
            "a redirect to \"{location}\", which is not a URL: {e}"
        ))
    })?;
    match (current.scheme(), next.scheme()) {
        ("https", "https") | ("http", "http" | "https") => Ok(next),
        (_, scheme) => Err(fail(format!(
            "a redirect to a {scheme} URL, which is not followed"
        ))),
    }
}

/// One request on a new connection.
async fn request(
    url: &Url,
    auth: Option<&Credentials>,
    roots: &Arc<RootCertStore>,
) -> Result<http::Response<hyper::body::Incoming>, DownloadError> {
    let fail = |why: String| DownloadError::Failed {
        url: shown(url),
        why,
    };
    let host = url
        .host_str()
        .ok_or_else(|| fail("the URL names no host".into()))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| fail("the URL names no port".into()))?;
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(fail(format!("{other}: only http and https are fetched"))),
    };
    let connect = async {
        let tcp = TcpStream::connect(format!("{host}:{port}"))
            .await
            .map_err(|e| fail(format!("cannot connect to {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(Stream::Plain(tcp));
        }
        let name = match url.host() {
            Some(url::Host::Domain(d)) => ServerName::try_from(d.to_string())
                .map_err(|e| fail(format!("\"{d}\" is not a name TLS can verify: {e}")))?,
            Some(url::Host::Ipv4(ip)) => ServerName::from(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => ServerName::from(std::net::IpAddr::V6(ip)),
            None => return Err(fail("the URL names no host".into())),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default protocol versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS with {host}:{port} failed: {e}")))?;
        Ok(Stream::Tls(Box::new(stream)))
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| {
            Err(fail(format!(
                "no connection to {host}:{port} within {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        })?;
    let mut sender = match stream {
        Stream::Plain(s) => start(TokioIo::new(s)).await,
        Stream::Tls(s) => start(TokioIo::new(s)).await,
    }
    .map_err(|e| fail(format!("HTTP handshake failed: {e}")))?;

    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut req = Request::get(target)
        .header(header::HOST, authority)
        .header(
            header::USER_AGENT,
            concat!(
                "residency-proxy/",
                env!("CARGO_PKG_VERSION"),
                " (geo update)"
            ),
        )
        .header(header::ACCEPT, "*/*");
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, basic(a));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("cannot build the request: {e}")))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| fail(format!("no response: {e}")))
}

/// The response body, whole: at most `limit` bytes, and all that `Content-Length` announced.
async fn body(
    url: &Url,
    response: http::Response<hyper::body::Incoming>,
    limit: u64,
) -> Result<Vec<u8>, DownloadError> {
    let expected = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || DownloadError::TooLarge {
        url: shown(url),
        limit,
    };
    if expected.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let capacity = usize::try_from(expected.unwrap_or(0).min(limit)).unwrap_or(0);
    let mut out = Vec::with_capacity(capacity);
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() as u64 + data.len() as u64 > limit {
                        return Err(too_large());
                    }
                    out.extend_from_slice(&data);
                }
            }
            // A connection closed before the announced length is a short file, said as such.
            Err(_) if expected.is_some_and(|n| (out.len() as u64) < n) => {
                return Err(DownloadError::Truncated {
                    url: shown(url),
                    got: out.len() as u64,
                    expected: expected.unwrap_or(0),
                });
            }
            Err(e) => {
                return Err(DownloadError::Failed {
                    url: shown(url),
                    why: format!("the transfer failed after {} bytes: {e}", out.len()),
                });
            }
        }
    }
    Ok(out)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An HTTP/1.1 connection over `io`, driven by a task of its own until the body is read (or
/// dropped with the response).
async fn start<T>(
    io: TokioIo<T>,
) -> hyper::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The platform's trust anchors (rustls-native-certs, which reads `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` when set).
fn platform_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    roots
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn percent_decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `Basic base64(user:password)`.
fn basic(c: &Credentials) -> String {
    format!(
        "Basic {}",
        base64(format!("{}:{}", c.user, c.password).as_bytes())
    )
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_rfc_4648_encodes_it() {
        // The test vectors of RFC 4648 section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
        let c = Credentials {
            user: "123456".into(),
            password: "k3y_ABC".into(),
        };
        assert_eq!(basic(&c), "Basic MTIzNDU2OmszeV9BQkM=");
    }

    #[tokio::test]
    async fn a_licence_key_in_the_query_is_not_sent_over_plain_http() {
        let u = Url::parse("http://downloads.example/geoip?edition_id=X&license_key=k").unwrap();
        let e = get(&u, None, 1 << 20).await.unwrap_err().to_string();
        assert!(e.contains("not sent over plain http"), "{e}");
        assert!(!e.contains("license_key=k"), "{e}");
    }

    #[test]
    fn shown_urls_carry_no_secret() {
        let u = Url::parse("https://123:secret@download.maxmind.com/app/geoip_download?edition_id=GeoLite2-Country&license_key=secret&suffix=tar.gz").unwrap();
        let s = shown(&u);
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("edition_id=GeoLite2-Country"), "{s}");
        let plain = Url::parse("https://download.db-ip.com/free/dbip-country-lite-2026-11.mmdb.gz")
            .unwrap();
        assert_eq!(shown(&plain), plain.as_str());
    }

    #[test]
    fn credentials_do_not_show_in_debug() {
        let c = Credentials {
            user: "123".into(),
            password: "secret".into(),
        };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
