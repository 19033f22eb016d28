//! The outbound HTTP call: one signed POST, classified into a typed result. No retries here;
//! the policy decides what an error means.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::error::{ConnectError, SendRequestError};
use bytes::Bytes;
use futures::StreamExt;

use crate::connection_budget::{is_local_shortage, BudgetedConnector, ConnectionBudget};
use crate::core::storable::StorableText;

/// Why an attempt produced no HTTP status. Every variant is a transport failure, i.e. retryable,
/// except `Refused` (permanent, no request made) and `LocalShortage` (no request made, and not
/// an attempt at all: the delivery actor answers the scheduler `NotMade`); `class()` is the
/// short name stored in the attempts table and logged as `error.class`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no response within {0:?}")]
    TimedOut(Duration),
    #[error("could not resolve the host: {0}")]
    Dns(String),
    #[error("could not connect: {0}")]
    Connect(#[source] ConnectError),
    /// This process, not the broker, was short of something to connect with: its outbound
    /// connection budget, file descriptors, ports or buffers. No request was made.
    #[error("no request made, this process is short of resources: {0}")]
    LocalShortage(#[source] std::io::Error),
    #[error("refused by the SSRF guard: {0}")]
    Refused(#[source] crate::core::ssrf::Refusal),
    #[error("TLS is not configured for this URL")]
    TlsUnavailable,
    #[error("connection failed while sending the request: {0}")]
    Io(#[source] std::io::Error),
    #[error("the response was not valid HTTP: {0}")]
    BadResponse(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl SendError {
    pub fn class(&self) -> &'static str {
        match self {
            SendError::TimedOut(_) => "timeout",
            SendError::Refused(_) => "ssrf_refused",
            SendError::Dns(_) => "dns",
            SendError::Connect(_) => "connect",
            SendError::LocalShortage(_) => "local_shortage",
            SendError::TlsUnavailable => "tls",
            SendError::Io(_) => "io",
            SendError::BadResponse(_) => "bad_response",
            SendError::Other(_) => "other",
        }
    }

    fn from_awc(error: SendRequestError, timeout: Duration) -> SendError {
        match error {
            SendRequestError::Timeout => SendError::TimedOut(timeout),
            SendRequestError::Connect(ConnectError::Timeout) => SendError::TimedOut(timeout),
            SendRequestError::Connect(ConnectError::SslIsNotSupported) => SendError::TlsUnavailable,
            SendRequestError::Connect(ConnectError::Resolver(error)) => match find_refusal(error) {
                Ok(refusal) => SendError::Refused(refusal),
                // getaddrinfo out of descriptors for its DNS socket.
                Err(other) => match other.downcast::<std::io::Error>() {
                    Ok(io) if is_local_shortage(&io) => SendError::LocalShortage(*io),
                    Ok(io) => SendError::Dns(io.to_string()),
                    Err(other) => SendError::Dns(other.to_string()),
                },
            },
            SendRequestError::Connect(ConnectError::Io(error)) if is_local_shortage(&error) => {
                SendError::LocalShortage(error)
            }
            SendRequestError::Connect(e @ (ConnectError::NoRecords | ConnectError::Unresolved)) => {
                SendError::Dns(e.to_string())
            }
            SendRequestError::Connect(e) => SendError::Connect(e),
            SendRequestError::Send(e) => SendError::Io(e),
            SendRequestError::Response(e) => SendError::BadResponse(e.to_string()),
            other => SendError::Other(other.to_string()),
        }
    }
}

/// The SSRF guard's refusal travels up through the resolver as a boxed error, wrapped in the
/// connector's own error types on the way; unwrap until it is found (or is not there).
fn find_refusal(
    error: Box<dyn std::error::Error>,
) -> Result<crate::core::ssrf::Refusal, Box<dyn std::error::Error>> {
    let error = match error.downcast::<crate::core::ssrf::Refusal>() {
        Ok(refusal) => return Ok(*refusal),
        Err(error) => error,
    };
    let error = match error.downcast::<ConnectError>() {
        Ok(wrapped) => match *wrapped {
            ConnectError::Resolver(inner) => return find_refusal(inner),
            other => return Err(Box::new(other)),
        },
        Err(error) => error,
    };
    match error.downcast::<actix_tls::connect::ConnectError>() {
        Ok(wrapped) => match *wrapped {
            actix_tls::connect::ConnectError::Resolver(inner) => find_refusal(inner),
            other => Err(Box::new(other)),
        },
        Err(error) => Err(error),
    }
}

/// A fully prepared webhook: everything is computed before the call so the call is just I/O.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub url: url::Url,
    pub webhook_id: String,
    pub timestamp: i64,
    pub signature: String,
    pub sequence: i64,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct WebhookResponse {
    pub status: u16,
    /// Raw Retry-After header, if any; the policy parses it.
    pub retry_after: Option<String>,
    /// The first `max_response_bytes` of the body, for diagnosis: lossily decoded, NUL and
    /// control bytes escaped, cut to `max_response_bytes` (a binary or UTF-16 answer is stored
    /// like any other).
    pub body_excerpt: StorableText,
}

/// DNS resolution for the HTTP client that drops forbidden addresses, and refuses the
/// connection when none is left.
pub struct GuardedResolver {
    pub policy: Arc<crate::core::ssrf::NetworkPolicy>,
}

impl actix_tls::connect::Resolve for GuardedResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> futures::future::LocalBoxFuture<'a, Result<Vec<SocketAddr>, Box<dyn std::error::Error>>>
    {
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            self.policy.screen_resolved(host, resolved)
        })
    }
}

/// TLS for every broker's client: the webpki roots, built once (a client is built whenever an
/// actor starts or its idle sockets are let go).
fn tls_config() -> Arc<rustls::ClientConfig> {
    static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
            .with_no_client_auth(),
        )
    })
    .clone()
}

/// How one broker's HTTP client is built.
pub struct ClientSettings<'a> {
    pub user_agent: &'a str,
    pub timeout: Duration,
    /// Sockets this client opens at most (the broker's in-flight limit).
    pub max_connections: usize,
    /// An idle pooled socket older than this is not reused.
    pub keep_alive: Duration,
    pub policy: Arc<crate::core::ssrf::NetworkPolicy>,
    /// Every socket takes a permit from the process-wide budget.
    pub budget: Arc<ConnectionBudget>,
}

/// Builds the per-broker HTTP client: no redirects (a 3xx is a permanent failure, never
/// followed), TLS with the webpki roots, our user-agent, DNS through the SSRF guard, and every
/// socket counted against the process's outbound connection budget. `max_connections` bounds the
/// sockets this client opens at once, so file descriptors grow with active brokers times that,
/// and the budget bounds the total.
pub fn build_client(settings: ClientSettings<'_>) -> awc::Client {
    let resolver = actix_tls::connect::Resolver::custom(GuardedResolver {
        policy: settings.policy,
    });
    let tcp = BudgetedConnector::new(
        actix_tls::connect::Connector::new(resolver).service(),
        settings.budget,
    );
    awc::Client::builder()
        .connector(
            awc::Connector::new()
                .connector(tcp)
                .rustls_0_23(tls_config())
                .limit(settings.max_connections)
                .conn_keep_alive(settings.keep_alive)
                .timeout(settings.timeout),
        )
        .disable_redirects()
        .timeout(settings.timeout)
        .add_default_header((
            awc::http::header::USER_AGENT,
            settings.user_agent.to_owned(),
        ))
        .finish()
}

/// Sends one webhook. The whole exchange, body included, is bounded by `timeout`.
pub async fn send(
    client: &awc::Client,
    request: &WebhookRequest,
    timeout: Duration,
    max_response_bytes: usize,
) -> (Result<WebhookResponse, SendError>, Duration) {
    let started = Instant::now();
    let call = async {
        // No compression, by design: awc would inflate each gzip/deflate network chunk whole
        // into memory before we see it, so a 1 MB gzip of zeros becomes a 1 GB allocation and
        // `max_response_bytes` would bound nothing. We keep only a few KB of the body for
        // diagnosis, so decoding buys nothing: we ask for `identity`, never decode, and do not
        // read a body sent compressed anyway (docs/webhook-contract.md 5).
        let mut response = client
            .post(request.url.as_str())
            .no_decompress()
            .insert_header((awc::http::header::ACCEPT_ENCODING, "identity"))
            .insert_header(("content-type", "application/json"))
            .insert_header(("webhook-id", request.webhook_id.as_str()))
            .insert_header(("webhook-timestamp", request.timestamp.to_string()))
            .insert_header(("webhook-signature", request.signature.as_str()))
            .insert_header(("webhook-sequence", request.sequence.to_string()))
            .send_body(request.body.clone())
            .await
            .map_err(|e| SendError::from_awc(e, timeout))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(awc::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(note) = undecoded_body_note(response.headers()) {
            return Ok(WebhookResponse {
                status,
                retry_after,
                body_excerpt: StorableText::from_text(&note, max_response_bytes),
            });
        }
        // Read at most max_response_bytes; a broker that streams forever cannot hold us.
        let mut excerpt = Vec::new();
        while excerpt.len() < max_response_bytes {
            match response.next().await {
                Some(Ok(chunk)) => excerpt.extend_from_slice(&chunk),
                _ => break,
            }
        }
        excerpt.truncate(max_response_bytes);
        Ok(WebhookResponse {
            status,
            retry_after,
            body_excerpt: StorableText::from_bytes_lossy(&excerpt, max_response_bytes),
        })
    };
    let result = match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(SendError::TimedOut(timeout)),
    };
    (result, started.elapsed())
}

/// What we record instead of a body the broker compressed although we asked for `identity`:
/// its raw bytes would tell on-call nothing. The header value is the broker's text, so only a
/// short run of token characters is echoed.
fn undecoded_body_note(headers: &awc::http::header::HeaderMap) -> Option<String> {
    let value = headers.get(awc::http::header::CONTENT_ENCODING)?;
    let encoding = value.to_str().unwrap_or("unreadable").trim();
    if encoding.is_empty() || encoding.eq_ignore_ascii_case("identity") {
        return None;
    }
    let shown: String = encoding
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ',' | ' '))
        .take(32)
        .collect();
    Some(format!("[{shown}-encoded response body, not decoded]"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use awc::http::header::{HeaderMap, HeaderValue, CONTENT_ENCODING};

    fn encoded(value: &'static [u8]) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_ENCODING, HeaderValue::from_bytes(value).unwrap());
        undecoded_body_note(&headers)
    }

    fn classified(error: std::io::Error) -> &'static str {
        SendError::from_awc(
            SendRequestError::Connect(ConnectError::Io(error)),
            Duration::from_secs(1),
        )
        .class()
    }

    /// Out of descriptors, ports or buffers is our shortage; a refused or unreachable broker is
    /// the broker's failure.
    #[test]
    fn a_connect_failing_for_want_of_local_resources_is_a_local_shortage() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
            libc::ENOMEM,
        ] {
            let error = std::io::Error::from_raw_os_error(errno);
            assert_eq!(classified(error), "local_shortage", "errno {errno}");
        }
        for errno in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ECONNRESET] {
            let error = std::io::Error::from_raw_os_error(errno);
            assert_eq!(classified(error), "connect", "errno {errno}");
        }
        let exhausted = crate::connection_budget::BudgetExhausted { open: 8, max: 8 };
        assert_eq!(
            classified(std::io::Error::other(exhausted)),
            "local_shortage"
        );
        // getaddrinfo out of descriptors comes through the resolver.
        let resolver = SendError::from_awc(
            SendRequestError::Connect(ConnectError::Resolver(Box::new(
                std::io::Error::from_raw_os_error(libc::EMFILE),
            ))),
            Duration::from_secs(1),
        );
        assert_eq!(resolver.class(), "local_shortage");
    }

    #[test]
    fn compressed_bodies_are_noted_not_read() {
        assert_eq!(undecoded_body_note(&HeaderMap::new()), None);
        assert_eq!(encoded(b"identity"), None);
        assert_eq!(encoded(b" Identity "), None);
        assert_eq!(
            encoded(b"gzip").as_deref(),
            Some("[gzip-encoded response body, not decoded]")
        );
        assert_eq!(
            encoded(b"br\xff").as_deref(),
            Some("[unreadable-encoded response body, not decoded]")
        );
        assert_eq!(
            encoded(b"gzip\"; <script>").as_deref(),
            Some("[gzip script-encoded response body, not decoded]")
        );
    }

    fn resolver_error(error: Box<dyn std::error::Error>) -> SendError {
        SendError::from_awc(
            SendRequestError::Connect(ConnectError::Resolver(error)),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn dns_failures_are_transport_errors_and_refusals_are_not() {
        let empty = resolver_error(Box::new(crate::core::ssrf::NoAddresses(
            "tms.example.com".into(),
        )));
        assert_eq!(empty.class(), "dns", "{empty}");
        let refused = resolver_error(Box::new(crate::core::ssrf::Refusal::ForbiddenAddress(
            "10.0.0.1".parse().unwrap(),
            "private",
        )));
        assert_eq!(refused.class(), "ssrf_refused", "{refused}");
        for error in [ConnectError::NoRecords, ConnectError::Unresolved] {
            let error =
                SendError::from_awc(SendRequestError::Connect(error), Duration::from_secs(1));
            assert_eq!(error.class(), "dns", "{error}");
        }
    }
}
