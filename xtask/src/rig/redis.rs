//! Debian's Redis, plain and TLS ports.

use super::*;

impl Rig {
    pub(super) fn start_redis(&self, dir: &Path) -> Res {
        need_command("redis-server", &["redis-server"])?;
        let tls = dir.join("tls");
        make_tls_certificates(&tls)?;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &REDIS_PORT.to_string(),
            "--dir",
        ])
        .arg(dir)
        .args([
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            // TLS on a second port, with the rig's own CA; clients must present a
            // certificate of it (mutual TLS).
            "--tls-port",
            &REDIS_TLS_PORT.to_string(),
            "--tls-auth-clients",
            "yes",
            "--tls-cert-file",
        ])
        .arg(tls.join("server.pem"))
        .arg("--tls-key-file")
        .arg(tls.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(tls.join("ca.pem"));
        self.spawn(Broker::Redis, "pid", &mut cmd, &dir.join("redis.log"))
    }
}

pub(super) fn redis_ping() -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], REDIS_PORT));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}
