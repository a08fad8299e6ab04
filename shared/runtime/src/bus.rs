//! The NATS connection and typed requests between services.
//!
//! A request carries the caller's trace context in its headers, refuses to send more than the
//! server's `max_payload`, and decodes the reply against the reply schema; an error reply comes
//! back as [`RequestError::Remote`] with the callee's [`WireError`].

use std::path::Path;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use tracing::Instrument as _;

use super::config::NatsConfig;
use super::observe;
use toka_contract::schema::{self, Contract, ReplyContract};
use toka_contract::wire::{ErrorCode, Reply, WireError};

/// Why the bus could not connect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The nkey seed file is unusable.
    #[error("nats.nkey_seed_file {path}: {reason}")]
    Seed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No connection within the connect timeout.
    #[error("cannot connect to NATS at {url} within {timeout_ms} ms: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// The timeout.
        timeout_ms: u64,
        /// The last failure.
        reason: String,
    },
    /// The connection token is not a Toka token.
    #[error("the connection token is not a Toka token (it has no jti); `toka token issue` makes one")]
    NotAToken,
}

/// Why a request to another service failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request is larger than the server accepts.
    #[error("request of {size} bytes exceeds the server's max_payload of {max} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Nobody serves the subject (the service is down or not yet registered).
    #[error("no service answers on {0}")]
    NoResponders(String),
    /// No reply in time.
    #[error("no reply on {0} in time")]
    Timeout(String),
    /// The connection failed.
    #[error("request on {subject} failed: {reason}")]
    Transport {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
    /// The reply is not what the contract says.
    #[error("reply on {subject} breaks the contract: {error}")]
    Contract {
        /// The subject.
        subject: String,
        /// Why.
        error: schema::DecodeError,
    },
    /// The service answered with an error.
    #[error(transparent)]
    Remote(WireError),
}

impl RequestError {
    /// The error to pass on to our own caller.
    pub fn to_wire(&self) -> WireError {
        match self {
            RequestError::Remote(e) => e.clone(),
            RequestError::TooLarge { size, max } => {
                WireError::too_large(self.to_string(), "nats.max_payload", *max as u64, Some(*size as u64))
            }
            RequestError::NoResponders(_) | RequestError::Timeout(_) | RequestError::Transport { .. } => {
                WireError::new(ErrorCode::Unavailable, self.to_string()).with_retry_after_ms(1_000)
            }
            RequestError::Contract { .. } => WireError::new(ErrorCode::Internal, self.to_string()),
        }
    }
}

/// A connected NATS client.
#[derive(Debug, Clone)]
pub struct Bus {
    client: Client,
    request_timeout: Duration,
}

/// Reads a user nkey seed, refusing a file that others may read.
fn read_seed(path: &Path) -> Result<String, Error> {
    read_seed_of(path, "SU", "a user nkey seed")
}

/// Reads an nkey seed starting `prefix` (`SU` user, `SA` account, `SX` curve), refusing a file
/// that others may read.
pub fn read_seed_of(path: &Path, prefix: &str, what: &str) -> Result<String, Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let fail = |reason: String| Error::Seed { path: path.display().to_string(), reason };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(fail(format!(
            "mode {:o} lets others read the seed; chmod 600 it",
            meta.permissions().mode() & 0o777
        )));
    }
    let seed = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let seed = seed.trim().to_owned();
    if !seed.starts_with(prefix) {
        return Err(fail(format!("not {what} (expected {prefix}…)")));
    }
    Ok(seed)
}

/// How a connection proves who it is.
#[derive(Clone)]
enum Credential {
    /// A user nkey seed.
    Seed(String),
    /// A Toka token, which auth's callout turns into a user of the `TOKA` account.
    Token(String),
    /// Nothing: a secured server refuses it.
    Anonymous,
}

impl Bus {
    /// Connects as `name` with replies coming to `inbox` (the user's inbox prefix,
    /// `toka_contract::access::Role::inbox`), retrying until the connect timeout.
    pub async fn connect(config: &NatsConfig, name: &str, inbox: &str) -> Result<Bus, Error> {
        let credential = match config.nkey_seed_file.as_deref() {
            Some(path) => Credential::Seed(read_seed(path)?),
            None => Credential::Anonymous,
        };
        Self::connect_as(config, credential, name, inbox).await
    }

    /// Connects as `name` with a Toka token, the way clients do: auth's callout checks the token
    /// and admits the connection with the token's permissions
    /// (`toka_contract::access::token_permissions`), replies coming to the token's own inbox.
    /// `nats.nkey_seed_file` is not used. The server closes the connection when the token
    /// expires or is revoked; connect again with a fresh one.
    pub async fn connect_with_token(config: &NatsConfig, name: &str, token: &str) -> Result<Bus, Error> {
        let jti = crate::token::unverified_jti(token).ok_or(Error::NotAToken)?;
        let inbox = toka_contract::access::token_inbox(&jti);
        Self::connect_as(config, Credential::Token(token.to_owned()), name, &inbox).await
    }

    /// Connects as the service's second user (`nats.state_nkey_seed_file`), for the work that
    /// is not serving requests.
    pub async fn connect_state(config: &NatsConfig, name: &str, inbox: &str) -> Result<Bus, Error> {
        let seed = config.state_nkey_seed_file.as_deref().ok_or_else(|| Error::Seed {
            path: "nats.state_nkey_seed_file".into(),
            reason: "not set: the service needs its state user (`toka nats-config` writes <role>-state.nk)".into(),
        })?;
        Self::connect_as(config, Credential::Seed(read_seed(seed)?), name, inbox).await
    }

    /// Connects as the user whose seed is at `seed` (a service's further users: auth's callout
    /// and system users).
    pub async fn connect_user(config: &NatsConfig, seed: &Path, name: &str, inbox: &str) -> Result<Bus, Error> {
        Self::connect_as(config, Credential::Seed(read_seed(seed)?), name, inbox).await
    }

    async fn connect_as(config: &NatsConfig, credential: Credential, name: &str, inbox: &str) -> Result<Bus, Error> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(config.connect_timeout_ms);
        let mut wait = Duration::from_millis(50);
        loop {
            let options = match &credential {
                Credential::Seed(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
                Credential::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
                Credential::Anonymous => async_nats::ConnectOptions::new(),
            }
            .name(name)
            .custom_inbox_prefix(inbox)
            .connection_timeout(Duration::from_secs(2));
            match options.connect(config.url.as_str()).await {
                Ok(client) => {
                    tracing::info!(url = %config.url, "connected to NATS");
                    return Ok(Bus { client, request_timeout: Duration::from_millis(config.request_timeout_ms) });
                }
                Err(e) if tokio::time::Instant::now() + wait < deadline => {
                    tracing::debug!(error = %e, "NATS not reachable yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(Error::Connect {
                        url: config.url.clone(),
                        timeout_ms: config.connect_timeout_ms,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The server's largest accepted message, in bytes.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Sends `body` to `subject` and decodes the typed reply.
    pub async fn request<Req: Contract, Rep: ReplyContract>(
        &self,
        subject: &str,
        body: &Req,
    ) -> Result<Rep, RequestError> {
        let span = tracing::info_span!(
            "nats.request",
            otel.kind = "client",
            otel.name = %format!("send {subject}"),
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.destination.name = %subject,
        );
        async {
            let payload = serde_json::to_vec(body)
                .map_err(|e| RequestError::Transport { subject: subject.to_owned(), reason: e.to_string() })?;
            let (size, max) = (payload.len(), self.max_payload());
            if size > max {
                return Err(RequestError::TooLarge { size, max });
            }
            let mut headers = HeaderMap::new();
            observe::inject(&tracing::Span::current(), &mut headers);
            let request =
                async_nats::Request::new().payload(payload.into()).headers(headers).timeout(Some(self.request_timeout));
            let message = self.client.send_request(subject.to_owned(), request).await.map_err(|e| {
                use async_nats::RequestErrorKind::*;
                match e.kind() {
                    NoResponders => RequestError::NoResponders(subject.to_owned()),
                    TimedOut => RequestError::Timeout(subject.to_owned()),
                    MaxPayloadExceeded => RequestError::TooLarge { size, max },
                    InvalidSubject | Other => {
                        RequestError::Transport { subject: subject.to_owned(), reason: e.to_string() }
                    }
                }
            })?;
            let reply: Reply<Rep> = schema::decode(&message.payload)
                .map_err(|error| RequestError::Contract { subject: subject.to_owned(), error })?;
            reply.into_result().map_err(RequestError::Remote)
        }
        .instrument(span)
        .await
    }

    /// Flushes what is buffered and closes the connection after in-flight messages.
    pub async fn drain(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::warn!(error = %e, "NATS drain failed");
        }
    }
}
