//! MQTT over TLS (port 8883): the server certificate from PEM files, reloaded when the files
//! change, so a renewed certificate (cert-manager, ACME) is served without a restart. Client
//! certificates are asked for but optional: one that chains to a CA its tenant registered
//! identifies the device (mTLS, [`TenantCaVerifier`]); without one, devices use tokens.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tern_identity::Identity;
use tern_runtime::Shutdown;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::{
    WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
};

/// Why a certificate and key could not be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read the private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate {cert} and the key {key} do not make a TLS configuration: {reason}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The TLS acceptor currently in force, and the files it came from.
pub struct TlsReloader {
    cert: PathBuf,
    key: PathBuf,
    clients: Option<Arc<dyn ClientCertVerifier>>,
    current: RwLock<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    stamp: Option<(SystemTime, SystemTime)>,
}

impl TlsReloader {
    /// Loads the certificate chain and key; an error here stops start-up. `clients` checks
    /// client certificates (none: not asked for).
    pub fn load(
        cert: &Path,
        key: &Path,
        clients: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Result<Arc<Self>, TlsError> {
        let acceptor = acceptor(cert, key, clients.clone())?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            clients,
            current: RwLock::new(Loaded {
                acceptor,
                stamp: stamp(cert, key),
            }),
        }))
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .acceptor
            .clone()
    }

    /// Checks the files every `every`; a changed pair that loads replaces the certificate for
    /// new connections (open ones keep theirs). One that does not load is logged and the
    /// previous certificate stays in force.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.reload_if_changed();
        }
    }

    /// Returns whether a new certificate was put in force.
    pub(crate) fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.cert, &self.key);
        if now.is_none() || now == self.current.read().unwrap_or_else(|e| e.into_inner()).stamp {
            return false;
        }
        match acceptor(&self.cert, &self.key, self.clients.clone()) {
            Ok(acceptor) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Loaded {
                    acceptor,
                    stamp: now,
                };
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Half-written files during a renewal also land here; the next change retries.
                tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays");
                false
            }
        }
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

fn acceptor(
    cert: &Path,
    key: &Path,
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<TlsAcceptor, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            let builder = match clients {
                Some(verifier) => builder.with_client_cert_verifier(verifier),
                None => builder.with_no_client_auth(),
            };
            builder.with_single_cert(chain, private_key)
        })
        .map_err(|e| TlsError::Config {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts client certificates issued by a CA some tenant registered (which one, and which
/// device, the connection finds out from the same certificate); requires one only when
/// `mqtt.tls.require_client_certificate` says so.
pub struct TenantCaVerifier {
    identity: Arc<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

// rustls wants verifiers to be Debug; the identity holds keys and is not.
impl std::fmt::Debug for TenantCaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantCaVerifier").finish_non_exhaustive()
    }
}

impl TenantCaVerifier {
    pub fn new(identity: Arc<Identity>, mandatory: bool) -> Arc<Self> {
        let provider = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider();
        Arc::new(Self {
            identity,
            algorithms: provider.signature_verification_algorithms,
            mandatory,
        })
    }
}

impl ClientCertVerifier for TenantCaVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, tokio_rustls::rustls::Error> {
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
            .chain(intermediates.iter().cloned())
            .collect();
        match self.identity.certificate_identity(&chain) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(tokio_rustls::rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_empty_files_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = TlsReloader::load(&cert, &key, None)
            .err()
            .expect("missing files");
        assert!(err.to_string().contains("cert.pem"), "{err}");
        std::fs::write(&cert, "not pem").expect("write");
        let err = TlsReloader::load(&cert, &key, None)
            .err()
            .expect("no certificate");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }
}
