//! Reaching the database: a store URL parsed with a sidecar's defaults (and shown without
//! its password), connections driven on their own tasks, calls bounded in time, and what can
//! go wrong with any of it ([`PgError`]). Separate because the registry, the reader and the
//! feed each hold connections of their own, made and bounded the same way.

use std::str::FromStr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// The `application_name` of the proxy's connections, unless the URL sets one.
pub(super) const APPLICATION: &str = "residency-proxy";
/// A query that takes longer counts as a lost connection.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("consent.store {target} is not a PostgreSQL connection URL: {source}")]
    Url {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot reach consent database {target}: {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("consent database {target}: {source}")]
    Query {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("consent database {target} did not answer within {} s", timeout.as_secs())]
    Timeout { target: String, timeout: Duration },
    #[error("consent database {target}: the connection closed")]
    Closed { target: String },
    #[error(
        "consent database {target} has schema version {found}, newer than this build knows ({known}): upgrade residency-proxy"
    )]
    TooNew {
        target: String,
        found: i32,
        known: i32,
    },
}

/// `postgres://user:secret@host/db` without the secret, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Parses a store URL, with defaults suited to a sidecar.
pub(super) fn config(url: &str) -> Result<(Config, String), PgError> {
    let target = redact(url);
    let mut config = Config::from_str(url).map_err(|source| PgError::Url {
        target: target.clone(),
        source,
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION);
    }
    config.keepalives(true);
    Ok((config, target))
}

/// Bounds a database call, naming the database when it takes too long.
pub(super) async fn bounded<T>(
    target: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(r) => r.map_err(|source| PgError::Query {
            target: target.into(),
            source,
        }),
        Err(_) => Err(PgError::Timeout {
            target: target.into(),
            timeout: QUERY_TIMEOUT,
        }),
    }
}

/// Connects, driving the connection on its own task. Notifications go to `notes` when given.
pub(super) async fn connect(
    config: &Config,
    target: &str,
    notes: Option<mpsc::UnboundedSender<String>>,
) -> Result<Client, PgError> {
    let (client, mut conn) = config
        .connect(NoTls)
        .await
        .map_err(|source| PgError::Connect {
            target: target.into(),
            source,
        })?;
    let target = target.to_string();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(tx) = &notes {
                        let _ = tx.send(n.payload().to_string());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(consent.store = %target, error = %e, "consent database connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cret@db.internal:5432/consents"),
            "postgres://app:***@db.internal:5432/consents"
        );
        assert_eq!(redact("postgres://app@db/c"), "postgres://app@db/c");
        assert_eq!(redact("postgres://db/c"), "postgres://db/c");
    }
}
