//! TLS for the mirror link: mutual TLS 1.3 over QUIC with rustls (ring), certificates and keys
//! from PEM files, the site id a gateway claims checked against its certificate, and the QUIC
//! transport settings (keep-alive and idle timeout for NAT, windows for the link). No 0-RTT:
//! mirror data is never sent replayable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::CongestionController;
use crate::protocol::ALPNS;

/// Why TLS could not be set up, or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("certificate is not valid for site {site:?}: {reason}")]
    SiteMismatch { site: String, reason: String },
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: e.to_string() }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings shared by both ends; `congestion` rules this end's sends.
pub fn transport(
    keep_alive: Duration,
    idle: Duration,
    streams: u32,
    congestion: CongestionController,
) -> Result<quinn::TransportConfig, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(match congestion {
        CongestionController::Bbr => Arc::new(crate::congestion::BoundedBbrConfig::default()),
        CongestionController::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        CongestionController::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
    });
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(idle.try_into().map_err(|e| TlsError::Config(format!("idle timeout: {e}")))?));
    t.max_concurrent_uni_streams(streams.into());
    t.max_concurrent_bidi_streams(4u32.into());
    // Per-stream and connection windows sized for a link of tens of Mbit/s at a few hundred ms.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    Ok(t)
}

/// The gateway's side: trusts `ca`, presents `cert`/`key`, offers every protocol version.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with_versions(ca, cert, key, transport, &ALPNS)
}

/// [`client_config`] offering only `versions` (ALPNs, preferred first): a gateway of an older
/// release, as the receiver must still serve it.
pub fn client_config_with_versions(
    ca: &Path,
    cert: &Path,
    key: &Path,
    transport: quinn::TransportConfig,
    versions: &[&[u8]],
) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = versions.iter().map(|a| a.to_vec()).collect();
    cfg.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(quic));
    c.transport_config(Arc::new(transport));
    Ok(c)
}

/// The cloud's side: presents `cert`/`key`, requires a client certificate signed by `ca`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with_versions(ca, cert, key, transport, &ALPNS)
}

/// [`server_config`] offering only `versions` (ALPNs): a receiver of an older release, as a
/// new gateway meets it.
pub fn server_config_with_versions(
    ca: &Path,
    cert: &Path,
    key: &Path,
    transport: quinn::TransportConfig,
    versions: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = versions.iter().map(|a| a.to_vec()).collect();
    cfg.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(quic));
    s.transport_config(Arc::new(transport));
    Ok(s)
}

/// The receiver's endpoint settings, the same in every process that serves with the TLS key
/// `key`, so a receiver SIGKILLed and started again ends the gateways' old connections at their
/// next packet (a stateless reset, RFC 9000 section 10.3) instead of leaving them to the idle
/// timeout. quinn's defaults defeat that twice over: a random reset key per process (the
/// gateway ignores a reset whose token it was not given) and connection ids signed with a random
/// key per process (the new process drops the old connection's packets as invalid instead of
/// answering them). Here the reset key is derived from the key file (secret; HMAC under it with a
/// fixed label is a PRF, so the derived key reveals nothing of it), and connection ids are
/// random and not signed: any short-header packet for an unknown connection gets a reset, at
/// most one per 20 ms (quinn's `min_reset_interval`), each smaller than the packet that caused it.
pub fn endpoint_config(key: &Path) -> Result<quinn::EndpointConfig, TlsError> {
    let secret = std::fs::read(key).map_err(|e| file_err(key, e))?;
    let derived = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        b"tributary-mirror stateless reset key v1",
    );
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())));
    cfg.cid_generator(|| Box::new(RandomCids));
    Ok(cfg)
}

/// Random 8-byte connection ids, valid in any process (see [`endpoint_config`]).
#[derive(Debug)]
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The protocol version the handshake settled on (its ALPN), if any.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// Checks that the peer's (already CA-verified) certificate names `site` exactly.
pub fn check_site(conn: &quinn::Connection, site: &str) -> Result<(), TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    check_cert_site(leaf, site)
}

/// Whether a certificate names `site`: one of its DNS names (subject alternative names) is
/// byte for byte the site id. DNS matching rules (case folding, a trailing dot, wildcards) do not
/// apply: the site id also names the site's session and remote topics, so `PLANT-7` or
/// `plant-7.` must not pass for `plant-7` and get topics of their own.
pub fn check_cert_site(cert: &CertificateDer<'_>, site: &str) -> Result<(), TlsError> {
    let mismatch = |reason: String| TlsError::SiteMismatch { site: site.to_string(), reason };
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| mismatch(e.to_string()))?;
    let san = x.subject_alternative_name().map_err(|e| mismatch(e.to_string()))?;
    let names: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(*d),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.contains(&site) {
        Ok(())
    } else {
        Err(mismatch(format!("the certificate names {names:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `names` from a throwaway CA (the CA check is rustls's, not this one's).
    fn cert(names: &[&str]) -> CertificateDer<'static> {
        let ca = crate::certs::new_ca("test CA", 1).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert, rcgen::KeyPair::from_pem(&ca.key).expect("ca key"))
            .expect("issuer");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.signed_by(&key, &issuer).expect("signed").der().clone()
    }

    #[test]
    fn a_site_matches_its_certificate_byte_for_byte() {
        let plant = cert(&["plant-7"]);
        assert!(check_cert_site(&plant, "plant-7").is_ok());
        for claim in ["PLANT-7", "Plant-7", "plant-7.", "plant-8", ""] {
            assert!(check_cert_site(&plant, claim).is_err(), "{claim:?} passed for a plant-7 certificate");
        }
        // A certificate made for another spelling does not pass for the canonical one either.
        assert!(check_cert_site(&cert(&["PLANT-7"]), "plant-7").is_err());
        assert!(check_cert_site(&cert(&["plant-7."]), "plant-7").is_err());
        assert!(check_cert_site(&cert(&["*.plant-7", "other"]), "plant-7").is_err());
    }
}
