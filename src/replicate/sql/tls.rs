//! TLS to the PostgreSQL shards, with rustls (the same stack as the API's `--tls-cert`).
//!
//! The shards' server certificates are verified against the CA certificates in
//! `--shard-ca` (a PEM file), and must name the host the shard URL connects to (an IP address
//! or a DNS name). Without `--shard-ca` there is no TLS: a URL with `sslmode=require` (over
//! TCP) is refused when the list is read, and `sslmode=prefer` (the default) connects in plain
//! text.
//! With it, every shard reached over TCP is reached over verified TLS only (`prefer` is taken
//! as `require`: a server, or a man in the middle, answering "no TLS" would otherwise get a
//! plain session), unless its URL says `sslmode=disable`; a shard on a Unix socket is local
//! and stays plain, whatever its `sslmode`.
//!
//! The connection carries no channel binding (SCRAM without `-PLUS`): the certificate check
//! already tells the server apart from a man in the middle.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// The TLS client set-up for the shards: the trusted CAs of `--shard-ca`.
pub type ShardTls = Arc<rustls::ClientConfig>;

/// Reads the CA certificates in `path` (PEM) into a client set-up that trusts them alone.
pub fn load_ca(path: &Path) -> anyhow::Result<ShardTls> {
    let what = || format!("--shard-ca {}", path.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(what)?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(what)?;
    if certs.is_empty() {
        anyhow::bail!("{}: no PEM certificate in the file", what());
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("{}: certificate {}: {e}", what(), i + 1))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether `error` (from connecting) is a TLS refusal of the driver's own: a certificate that
/// does not verify, a handshake rustls rejects. Those would only fail again; a connection
/// broken during the handshake is an I/O error without a rustls error inside.
pub fn is_tls_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if cause.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// `MakeTlsConnect` for tokio-postgres over rustls.
#[derive(Clone)]
pub struct MakeRustls(pub ShardTls);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        // A name that cannot be checked fails the handshake, if there is one, not the
        // connection: the driver asks for a connector before it knows the server's answer.
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| format!("{domain:?} cannot be checked against a certificate: {e}"));
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self
                .name
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            self.connector.connect(name, stream).await.map(RustlsStream)
        })
    }
}

/// A TLS connection to a shard.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
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

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let error = load_ca(&empty).expect_err("no certificate");
        let text = format!("{error:#}");
        assert!(
            text.contains("--shard-ca") && text.contains("no PEM certificate"),
            "{text}"
        );
        let missing = dir.path().join("missing.pem");
        let error = load_ca(&missing).expect_err("no file");
        assert!(format!("{error:#}").contains("missing.pem"), "{error:#}");
    }
}
