//! Certificates for the mirror link: a private CA, per-site client certificates (the site id is
//! the certificate's DNS name) and the cloud receiver's server certificate, all as PEM files.
//! Used by `tributary cert` and by the tests.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid site id {0:?}: a DNS label of lowercase letters, digits and '-' is required")]
    InvalidSite(String),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Pem {
    /// Writes `{name}.pem` and `{name}.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), CertError> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.display().to_string(), source })?;
        let write = |file: String, body: &str, private: bool| -> Result<(), CertError> {
            let path = dir.join(file);
            let io = |source| CertError::Io { path: path.display().to_string(), source };
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            if private {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            std::io::Write::write_all(&mut opts.open(&path).map_err(io)?, body.as_bytes()).map_err(io)
        };
        write(format!("{name}.pem"), &self.cert, false)?;
        write(format!("{name}.key"), &self.key, true)
    }

    /// Reads `{name}.pem` and `{name}.key` from `dir`.
    pub fn read(dir: &Path, name: &str) -> Result<Self, CertError> {
        let read = |file: String| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| CertError::Io { path: path.display().to_string(), source })
        };
        Ok(Self { cert: read(format!("{name}.pem"))?, key: read(format!("{name}.key"))? })
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days.into());
}

/// A new certificate authority for one deployment.
pub fn new_ca(name: &str, days: u32) -> Result<Pem, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

fn issue(ca: &Pem, names: Vec<String>, common: &str, client: bool, days: u32) -> Result<Pem, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, common);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// A gateway's client certificate: the site id is its DNS name, which the cloud checks against
/// the site the gateway claims.
pub fn site_cert(ca: &Pem, site: &str, days: u32) -> Result<Pem, CertError> {
    if !crate::config::valid_site(site) {
        return Err(CertError::InvalidSite(site.to_string()));
    }
    issue(ca, vec![site.to_string()], site, true, days)
}

/// The cloud receiver's server certificate for the names gateways dial (DNS names or IPs).
pub fn server_cert(ca: &Pem, names: &[String], days: u32) -> Result<Pem, CertError> {
    let common = names.first().cloned().unwrap_or_else(|| "tributary-cloud".into());
    issue(ca, names.to_vec(), &common, false, days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn a_site_certificate_names_its_site_only() {
        let ca = new_ca("test CA", 1).expect("ca");
        let site = site_cert(&ca, "plant-7", 1).expect("site");
        let der = CertificateDer::from_pem_slice(site.cert.as_bytes()).expect("pem");
        assert!(crate::tls::check_cert_site(&der, "plant-7").is_ok());
        assert!(crate::tls::check_cert_site(&der, "plant-8").is_err());
        assert!(matches!(site_cert(&ca, "bad_site", 1), Err(CertError::InvalidSite(_))));
        let dir = tempfile::tempdir().expect("tempdir");
        site.write(dir.path(), "site").expect("write");
        let back = Pem::read(dir.path(), "site").expect("read");
        assert_eq!(back.cert, site.cert);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("site.key")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "private key readable by its owner only");
    }
}
