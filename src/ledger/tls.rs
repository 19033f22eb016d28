//! TLS to Postgres with rustls, with libpq's `sslmode` meanings (tokio-postgres itself only knows
//! disable, prefer and require, and leaves verification to the connector):
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `prefer` (default) | if the server offers TLS | no* |
//! | `require` | yes, or no connection | no* |
//! | `verify-ca` | yes | chain to a trusted CA |
//! | `verify-full` | yes | chain, and the URL's host is a name in the certificate |
//!
//! *As in libpq: once a CA is configured (`postgres.ca_file`, or `sslrootcert` in the URL),
//! `prefer` and `require` check the chain as `verify-ca` does. Trusted CAs are that file's
//! certificates, or else the Mozilla root set compiled in (`webpki-roots`, the same set the
//! webhook client trusts), so a container needs no CA bundle and behaves the same everywhere.
//!
//! SCRAM channel binding is not offered (`ChannelBinding::none()`): servers accept SCRAM without
//! it, and computing it needs the certificate's signature hash, which rustls does not expose.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres must do on the wire: whether TLS is optional or mandatory.
    pub fn wire_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every variant names the setting to change. None of them carries the URL (it may hold the
/// password). Clone: a handshake error reaches the ledger by reference, inside tokio-postgres'.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PostgresTlsError {
    #[error(
        "invalid sslmode in postgres.url: use disable, prefer, require, verify-ca or verify-full"
    )]
    InvalidSslMode,
    #[error("the CA is set twice: use postgres.ca_file or sslrootcert in postgres.url, not both")]
    CaSetTwice,
    #[error("postgres.ca_file {path} could not be used: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("the Postgres server's certificate was refused (sslmode={mode}): {hint}")]
    CertificateRefused {
        mode: SslMode,
        hint: String,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS handshake with Postgres failed (sslmode={mode}): {reason}")]
    Handshake { mode: SslMode, reason: String },
    #[error("the host in postgres.url is not usable as a TLS server name")]
    ServerName,
}

/// `postgres.url` with the TLS parameters taken out: tokio-postgres refuses `verify-ca`,
/// `verify-full` and `sslrootcert`, so they are read here and the rest is passed on untouched.
#[derive(Debug, PartialEq)]
pub struct TlsUrl {
    pub url: String,
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

impl TlsUrl {
    pub fn parse(url: &str) -> Result<TlsUrl, PostgresTlsError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let Some((key, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
                continue;
            };
            match &*key {
                "sslmode" => {
                    mode = SslMode::parse(&value).ok_or(PostgresTlsError::InvalidSslMode)?
                }
                // libpq's "system" is the default trust set here anyway.
                "sslrootcert" if value != "system" => root_cert = Some(PathBuf::from(&*value)),
                "sslrootcert" => {}
                _ => kept.push(pair),
            }
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(TlsUrl {
            url,
            mode,
            root_cert,
        })
    }
}

/// The `MakeTlsConnect` handed to the connection pool.
#[derive(Clone)]
pub struct PostgresTls {
    mode: SslMode,
    /// Whether a CA file is configured; it changes what to tell the operator.
    private_ca: bool,
    config: Arc<rustls::ClientConfig>,
}

impl PostgresTls {
    /// `ca_file`: `postgres.ca_file` or the URL's `sslrootcert` (at most one of them).
    pub fn new(mode: SslMode, ca_file: Option<&Path>) -> Result<PostgresTls, PostgresTlsError> {
        // With TLS off the CA is never used; libpq does not read it either.
        let ca_file = ca_file.filter(|_| mode != SslMode::Disable);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match ca_file {
            Some(path) => load_ca_file(path)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|error| PostgresTlsError::CaFile {
                path: ca_file.map(Path::to_path_buf).unwrap_or_default(),
                reason: error.to_string(),
            })?;
        let check = match (mode, ca_file.is_some()) {
            (SslMode::VerifyFull, _) => Check::Full,
            (SslMode::VerifyCa, _) | (SslMode::Prefer | SslMode::Require, true) => Check::Chain,
            (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, false) => Check::Nothing,
        };
        let verifier = Arc::new(Verifier {
            check,
            webpki,
            provider: provider.clone(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PostgresTls {
            mode,
            private_ca: ca_file.is_some(),
            config: Arc::new(config),
        })
    }
}

fn load_ca_file(path: &Path) -> Result<RootCertStore, PostgresTlsError> {
    let refused = |reason: String| PostgresTlsError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    let certificates =
        CertificateDer::pem_file_iter(path).map_err(|error| refused(error.to_string()))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|error| refused(error.to_string()))?;
        roots
            .add(certificate)
            .map_err(|error| refused(error.to_string()))?;
    }
    if roots.is_empty() {
        return Err(refused("it holds no PEM certificate".into()));
    }
    Ok(roots)
}

#[derive(Debug, Clone, Copy)]
enum Check {
    /// `require`/`prefer` without a CA: encrypted, but anyone's certificate is accepted.
    Nothing,
    /// The chain must lead to a trusted CA; the host name is not compared.
    Chain,
    /// Chain and host name.
    Full,
}

#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = || {
            self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )
        };
        match self.check {
            Check::Nothing => Ok(ServerCertVerified::assertion()),
            Check::Full => verdict(),
            // webpki checks the chain before the name, so a name error means the chain is good.
            Check::Chain => match verdict() {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
        }
    }

    // Whatever the mode, the server must prove it holds the certificate's key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl MakeTlsConnect<Socket> for PostgresTls {
    type Stream = PostgresTlsStream;
    type TlsConnect = PostgresTlsConnect;
    type Error = PostgresTlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<PostgresTlsConnect, PostgresTlsError> {
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|_| PostgresTlsError::ServerName)?;
        Ok(PostgresTlsConnect {
            tls: self.clone(),
            server_name,
        })
    }
}

pub struct PostgresTlsConnect {
    tls: PostgresTls,
    server_name: ServerName<'static>,
}

impl TlsConnect<Socket> for PostgresTlsConnect {
    type Stream = PostgresTlsStream;
    type Error = PostgresTlsError;
    type Future = Pin<Box<dyn Future<Output = Result<PostgresTlsStream, PostgresTlsError>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.tls.config.clone());
            connector
                .connect(self.server_name, socket)
                .await
                .map(PostgresTlsStream)
                .map_err(|error| explain(&self.tls, error))
        })
    }
}

/// A refused certificate says what to change; anything else keeps rustls' or the socket's words.
fn explain(tls: &PostgresTls, error: io::Error) -> PostgresTlsError {
    let refused = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|inner| match inner {
            rustls::Error::InvalidCertificate(reason) => Some((inner.clone(), reason.clone())),
            _ => None,
        });
    let Some((source, reason)) = refused else {
        return PostgresTlsError::Handshake {
            mode: tls.mode,
            reason: error.to_string(),
        };
    };
    let hint = match reason {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "the host in postgres.url is not a name the certificate was issued for: connect by \
             one of its names, or use sslmode=verify-ca in postgres.url to check only the CA"
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => {
            "it is outside its validity period: renew it on the server (or check this machine's clock)"
        }
        _ if tls.private_ca => {
            "it is not signed by the CA in postgres.ca_file: point postgres.ca_file at the CA \
             that issued the server's certificate"
        }
        _ => {
            "it is not signed by a publicly trusted CA: set postgres.ca_file to the CA that \
             issued it (or sslmode=require in postgres.url to encrypt without verifying)"
        }
    };
    PostgresTlsError::CertificateRefused {
        mode: tls.mode,
        hint: hint.to_owned(),
        source,
    }
}

pub struct PostgresTlsStream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for PostgresTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PostgresTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for PostgresTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let parsed = TlsUrl::parse(
            "postgres://u:p%3Fw@db:5432/ledger?application_name=wd&sslmode=verify-full&sslrootcert=%2Fca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(parsed.mode, SslMode::VerifyFull);
        assert_eq!(parsed.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            parsed.url,
            "postgres://u:p%3Fw@db:5432/ledger?application_name=wd&connect_timeout=5"
        );
    }

    #[test]
    fn without_sslmode_the_url_is_untouched_and_tls_is_preferred() {
        let parsed = TlsUrl::parse("postgres://postgres@127.0.0.1:5432/test").unwrap();
        assert_eq!(parsed.mode, SslMode::Prefer);
        assert_eq!(parsed.url, "postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(parsed.root_cert, None);
    }

    #[test]
    fn every_libpq_mode_parses_and_others_are_refused_without_echoing_the_url() {
        for (value, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let url = format!("postgres://h/db?sslmode={value}");
            assert_eq!(TlsUrl::parse(&url).unwrap().mode, mode);
            assert_eq!(mode.to_string(), value);
        }
        let error = TlsUrl::parse("postgres://u:hunter2@h/db?sslmode=allow-ish").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("postgres.url") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn sslrootcert_system_means_the_default_roots() {
        let parsed = TlsUrl::parse("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!(parsed.root_cert, None);
        assert_eq!(parsed.url, "postgres://h/db");
    }

    #[test]
    fn a_ca_file_without_certificates_names_the_setting() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "not a certificate\n").unwrap();
        let error = PostgresTls::new(SslMode::VerifyCa, Some(file.path()))
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with("postgres.ca_file "),
            "{error}"
        );
        let error = PostgresTls::new(SslMode::VerifyCa, Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }
}
