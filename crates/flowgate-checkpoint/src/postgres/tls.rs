//! TLS to the server: rustls with the configured CA or the system's roots.

use super::*;

/// The rustls connector: the CA of `ca_file`, or the system's roots; ring as the crypto
/// provider (explicitly, whatever else the process links).
pub(super) fn tls_connector(
    t: &PostgresTls,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                Error::config("postgres store: the CA file cannot be read")
                    .with_context("key", "store.tls.ca_file")
                    .with_context("path", path.display())
                    .with_context("cause", e)
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in it"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::config(
                    "postgres store: no trusted root certificates on this system",
                )
                .with_context("key", "store.tls.ca_file")
                .with_hint(
                    "set store.tls.ca_file to the CA that signed the server's certificate",
                ));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::fatal("postgres store: TLS setup failed").with_source(e))?
    .with_root_certificates(roots);
    let config = match flowgate_core::tls::ClientIdentity::load(
        t.cert_file.as_ref(),
        t.key_file.as_ref(),
        "store.tls",
    )? {
        None => config.with_no_client_auth(),
        Some(id) => {
            use rustls::pki_types::PrivateKeyDer;
            let bad = |what: &str, e: &dyn std::fmt::Display| {
                Error::config(format!(
                    "postgres store: the client {what} cannot be parsed"
                ))
                .with_context("key", "store.tls")
                .with_context("cause", e)
            };
            let certs = CertificateDer::pem_slice_iter(&id.cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(&id.key_pem).map_err(|e| bad("key", &e))?;
            config
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad("certificate and key", &e))?
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
