//! TLS for the listeners (rustls with ring, TLS 1.2 and 1.3): the server certificate and key
//! from PEM files, optional client certificates checked against a CA (a certificate that does
//! not verify, expired or from another CA, fails the handshake; none at all is allowed, so
//! password clients share the listener), and the name a client certificate gives its holder.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: {path}: {reason}")]
    File { key: String, path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Paths of a listener's TLS files, with the config keys that hold them (for errors).
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    /// The TOML table, e.g. `mqtt.tls`.
    pub prefix: &'a str,
    pub cert_file: &'a str,
    pub key_file: &'a str,
    /// Empty = no client certificates asked for.
    pub client_ca_file: &'a str,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(prefix: &str, key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File { key: format!("{prefix}.{key}"), path: path.to_string(), reason };
    let certs: Vec<_> = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The rustls server settings of a listener.
pub fn server_config(files: TlsFiles<'_>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(files.prefix, "cert_file", files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(Path::new(files.key_file)).map_err(|e| TlsError::File {
        key: format!("{}.key_file", files.prefix),
        path: files.key_file.to_string(),
        reason: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if files.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(files.prefix, "client_ca_file", files.client_ca_file)? {
            roots.add(c).map_err(|e| TlsError::File {
                key: format!("{}.client_ca_file", files.prefix),
                path: files.client_ca_file.to_string(),
                reason: e.to_string(),
            })?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let cfg = builder.with_single_cert(certs, key).map_err(|e| TlsError::Config(format!("{}: {e}", files.prefix)))?;
    Ok(Arc::new(cfg))
}

/// The name a verified client certificate gives its holder: its subject common name, or else
/// its first DNS name.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Some(cn) = x.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Some(cn.to_string());
    }
    let san = x.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_string()),
        _ => None,
    })
}

/// The client-certificate name of a TLS connection, if the client presented one.
pub fn peer_name(conn: &rustls::ServerConnection) -> Option<String> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(certificate_name)
}
