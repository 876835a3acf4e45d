//! Client certificates for mutual TLS, read the same way by every adapter and store.

use std::path::{Path, PathBuf};

use crate::Error;

/// A client certificate and its private key, both PEM, as read from their files.
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// The private key (PEM; PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ClientIdentity {
    /// Reads `cert_file` and `key_file` when both are given, `None` when neither is. Errors
    /// name the key (`{prefix}.cert_file`, `{prefix}.key_file`) and the path, never the
    /// key's content.
    pub fn load(
        cert_file: Option<&PathBuf>,
        key_file: Option<&PathBuf>,
        prefix: &str,
    ) -> Result<Option<ClientIdentity>, Error> {
        match (cert_file, key_file) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(ClientIdentity {
                cert_pem: read_pem(cert, &format!("{prefix}.cert_file"), "CERTIFICATE")?,
                key_pem: read_pem(key, &format!("{prefix}.key_file"), "PRIVATE KEY")?,
            })),
            (Some(_), None) | (None, Some(_)) => Err(Error::config(
                "a client certificate needs both cert_file and key_file",
            )
            .with_context("key", prefix.to_string())),
        }
    }
}

/// Whether an error's text says the server refused the client's certificate, or the lack of
/// one (a TLS alert the server sent, or its own message): retrying cannot fix that.
pub fn refused_client_certificate(error_text: &str) -> bool {
    const SIGNS: [&str; 7] = [
        "alert: CertificateRequired",
        "alert: BadCertificate",
        "alert: UnknownCA",
        "alert: CertificateUnknown",
        "alert: UnsupportedCertificate",
        "alert: CertificateExpired",
        "requires a valid client certificate",
    ];
    SIGNS.iter().any(|s| error_text.contains(s))
}

/// The file's bytes, if it reads and holds a PEM block whose label contains `label`.
fn read_pem(path: &Path, key: &str, label: &str) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::config("a TLS file cannot be read")
            .with_context("key", key.to_string())
            .with_context("path", path.display())
            .with_context("cause", e)
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(label));
    if !found {
        return Err(Error::config(format!("the file holds no PEM {label}"))
            .with_context("key", key.to_string())
            .with_context("path", path.display()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither_and_errors_name_the_key() {
        assert!(
            ClientIdentity::load(None, None, "store.tls")
                .unwrap()
                .is_none()
        );
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = ClientIdentity::load(Some(&cert), None, "store.tls").unwrap_err();
        assert!(err.to_string().contains("store.tls"), "{err}");
        let missing = dir.path().join("nope.key");
        let err = ClientIdentity::load(Some(&cert), Some(&missing), "source.tls").unwrap_err();
        assert!(err.to_string().contains("source.tls.key_file"), "{err}");
        let err = ClientIdentity::load(Some(&cert), Some(&cert), "source.tls").unwrap_err();
        assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
        let key = dir.path().join("k.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nsecret-bytes\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let id = ClientIdentity::load(Some(&cert), Some(&key), "source.tls")
            .unwrap()
            .unwrap();
        assert!(!format!("{id:?}").contains("secret-bytes"));
    }
}
