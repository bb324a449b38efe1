//! Native TLS on the listen port (SPEC §12): the certificate and key from
//! `TLS_CERT_FILE` / `TLS_KEY_FILE` (PEM), re-read on SIGHUP, and the relay
//! that lets a WebSocket over TLS use the same socket code as a plain one.
//!
//! - [`Acceptor`] holds the current `rustls` server config. A reload builds
//!   a new one from the files and swaps it in: handshakes from then on use
//!   it, connections already open keep the session they have. A reload that
//!   fails (missing file, bad PEM, key not matching) keeps the old one and
//!   returns the error, which the SIGHUP task logs; the node goes on.
//! - [`relay`]: the socket code (`ws::conn`, `ws::outbox`) writes frames
//!   straight to a kernel socket from any thread, without a lock around a
//!   split stream. A TLS session cannot be written that way, so an upgraded
//!   TLS connection gets a local socket pair: the socket code works on one
//!   end exactly as on a TCP stream, a task copies between the other end and
//!   the TLS stream. It costs that task, two more descriptors and two copy
//!   buffers per TLS socket; a deployment with very many sockets terminates
//!   TLS in front of the nodes instead (README, "TLS").
//!
//! Infrastructure: imports only `config` and `lock` (leaves).

use std::future::Future;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;
use crate::lock::{read, write};

/// A TLS connection as the listener hands it to hyper.
pub(crate) type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// How long a client may take over its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After the server's side of a relayed socket has ended, how long the relay
/// still waits for the client to close its side.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS_CERT_FILE {path}: {why}")]
    Cert { path: String, why: String },
    #[error("cannot read TLS_KEY_FILE {path}: {why}")]
    Key { path: String, why: String },
    #[error("TLS_CERT_FILE {path} holds no certificate")]
    NoCert { path: String },
    #[error("TLS certificate and key do not make a server config: {0}")]
    Config(#[from] rustls::Error),
}

/// The node's TLS settings: the files and the config built from them.
/// Cheap to clone; clones share the current config.
#[derive(Clone)]
pub struct Acceptor {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("files", &self.files)
            .finish()
    }
}

impl Acceptor {
    /// Reads the files; an error here stops the start.
    pub fn load(files: &TlsFiles) -> Result<Acceptor, TlsError> {
        let config = server_config(files)?;
        Ok(Acceptor {
            files: files.clone(),
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Re-reads the files; on success new handshakes use them, on failure
    /// nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *write(&self.current) = Arc::new(config);
        Ok(())
    }

    /// The acceptor for one new connection (the config current now).
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(read(&self.current).clone())
    }

    /// Reloads on every SIGHUP until `stop`; a failed reload is logged and
    /// the old certificate stays.
    pub(crate) fn reload_on_sighup(&self, stop: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: the TLS certificate will not reload");
                return;
            }
        };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                match me.reload() {
                    Ok(()) => tracing::info!(
                        cert = %me.files.cert.display(),
                        "SIGHUP: TLS certificate reloaded; new connections use it"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: TLS reload failed; keeping the previous certificate"
                    ),
                }
            }
        });
    }
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let cert_path = files.cert.display().to_string();
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: cert_path });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.display().to_string(),
        why: e.to_string(),
    })?;
    // The provider is named here, not taken from a process default, so the
    // node does not depend on which provider other crates switch on.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // HTTP/1.1 only (WebSocket upgrades need it; the server speaks no h2).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Splits an upgraded TLS connection into the local end the socket code
/// uses and the task that copies between the other end and the TLS stream.
/// The task ends when both directions have ended, or [`CLOSE_WAIT`] after
/// the server's side ended if the client does not close.
pub(crate) fn relay(
    tls: ServerStream,
) -> io::Result<(UnixStream, impl Future<Output = ()> + Send + 'static)> {
    let (local, inner) = UnixStream::pair()?;
    let pump = async move {
        let (mut tls_rd, mut tls_wr) = tokio::io::split(tls);
        let (mut in_rd, mut in_wr) = inner.into_split();
        // Client → server: what the client sends, decrypted, to the socket
        // code; its end of stream shuts our local end for writing.
        let up = async {
            let _ = tokio::io::copy(&mut tls_rd, &mut in_wr).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut in_wr).await;
        };
        // Server → client: the socket code's frames, encrypted; when it
        // shuts its side (after the close frame), close_notify and FIN.
        let down = async {
            let _ = tokio::io::copy(&mut in_rd, &mut tls_wr).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls_wr).await;
        };
        tokio::pin!(up, down);
        tokio::select! {
            _ = &mut up => {
                // The client is done sending; the server's frames still go
                // out until the socket code ends its side.
                (&mut down).await;
            }
            _ = &mut down => {
                let _ = tokio::time::timeout(CLOSE_WAIT, &mut up).await;
            }
        }
    };
    Ok((local, pump))
}
