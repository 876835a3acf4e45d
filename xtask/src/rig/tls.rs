//! The rig's own CA and the certificates every TLS listener and test client uses.

use super::*;

/// A CA and a server certificate for 127.0.0.1 signed by it (`ca.pem`, `server.pem`,
/// `server.key`), made once with `openssl`.
/// The rig's own CA, a server certificate for 127.0.0.1/localhost and a client certificate
/// (`CN=flowgate`) for mutual TLS, each made once.
pub(super) fn make_tls_certificates(dir: &Path) -> Res {
    if ["ca.pem", "server.pem", "client.pem"]
        .iter()
        .all(|f| dir.join(f).exists())
    {
        return Ok(());
    }
    need_command("openssl", &["openssl"])?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let openssl = |args: &[&str], what: &str| {
        run_quiet(Command::new("openssl").args(args).current_dir(dir), what)
    };
    if !dir.join("ca.pem").exists() {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                "/CN=flowgate rig CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
            "openssl: the rig's CA",
        )?;
    }
    let ext = dir.join("san.ext");
    fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        .map_err(|e| format!("cannot write {}: {e}", ext.display()))?;
    let client_ext = dir.join("client.ext");
    fs::write(&client_ext, "extendedKeyUsage=clientAuth\n")
        .map_err(|e| format!("cannot write {}: {e}", client_ext.display()))?;
    for (name, cn, ext) in [
        ("server", "/CN=127.0.0.1", "san.ext"),
        ("client", "/CN=flowgate", "client.ext"),
    ] {
        if dir.join(format!("{name}.pem")).exists() {
            continue;
        }
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", cn, "-keyout", &key, "-out", &csr,
            ],
            "openssl: a key",
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                ext,
                "-out",
                &pem,
            ],
            "openssl: a certificate",
        )?;
        // PostgreSQL refuses a key others can read (its own and a client's).
        fs::set_permissions(
            dir.join(&key),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|e| format!("chmod {key}: {e}"))?;
    }
    Ok(())
}
