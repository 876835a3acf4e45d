//! Debian's PostgreSQL, a cluster in the rig's directory, with a TLS listener requiring client certificates.

use super::*;

impl Rig {
    pub(super) fn start_postgres(&self, dir: &Path) -> Res {
        let bin = postgres_bin().ok_or_else(|| {
            if is_root() && has_apt() {
                String::new()
            } else {
                "postgres: the PostgreSQL server is not installed: `sudo apt-get install -y postgresql`".into()
            }
        });
        let bin = match bin {
            Ok(b) => b,
            Err(e) if e.is_empty() => {
                apt_install(&["postgresql"])?;
                postgres_bin().ok_or("postgres: installed postgresql but found no /usr/lib/postgresql/*/bin/postgres")?
            }
            Err(e) => return Err(e),
        };
        need_command("psql", &["postgresql-client"])?;
        let data = dir.join("data");
        let sock = dir.join("sock");
        fs::create_dir_all(&sock).map_err(|e| format!("cannot create {}: {e}", sock.display()))?;
        let tls = dir.join("tls");
        make_tls_certificates(&tls)?;
        if is_root() {
            // PostgreSQL refuses to run as root: hand its directory to the `postgres` user.
            run_quiet(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir),
                "chown postgres dir",
            )?;
        }
        if !data.join("PG_VERSION").exists() {
            let mut initdb = as_postgres(&bin.join("initdb"));
            initdb.arg("-D").arg(&data).args([
                "-U",
                "flowgate",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            run_quiet(&mut initdb, "initdb")?;
        }
        // Plain connections are trusted; TLS ones must present a client certificate of the
        // rig's CA whose CN is the user (`cert`), so mutual TLS is exercised for real.
        let hba = dir.join("pg_hba.conf");
        write(
            &hba,
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 cert\n\
             hostnossl all all 127.0.0.1/32 trust\n\
             host all all ::1/128 trust\n",
        )?;
        if is_root() {
            run_quiet(
                Command::new("chown").arg("postgres:postgres").arg(&hba),
                "chown pg_hba.conf",
            )?;
        }
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &POSTGRES_PORT.to_string(), "-k"])
            .arg(&sock)
            .args(["-c", "max_connections=200", "-c", "shared_buffers=64MB"])
            // TLS on the same port (clients choose; the store tests connect both ways).
            .args(["-c", "ssl=on", "-c"])
            .arg(format!(
                "ssl_cert_file={}",
                tls.join("server.pem").display()
            ))
            .arg("-c")
            .arg(format!("ssl_key_file={}", tls.join("server.key").display()))
            .arg("-c")
            .arg(format!("ssl_ca_file={}", tls.join("ca.pem").display()))
            .arg("-c")
            .arg(format!("hba_file={}", hba.display()));
        self.spawn(Broker::Postgres, "pid", &mut cmd, &dir.join("postgres.log"))?;
        wait_until("postgres", Duration::from_secs(60), || {
            Ok(psql("select 1").is_ok())
        })?;
        if psql("select 1 from pg_database where datname = 'flowgate'")?.trim() != "1" {
            psql("create database flowgate")?;
        }
        Ok(())
    }
}

pub(super) fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop()
}

pub(super) fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

pub(super) fn psql(sql: &str) -> Res<String> {
    psql_db("postgres", sql)
}

pub(super) fn psql_db(db: &str, sql: &str) -> Res<String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &POSTGRES_PORT.to_string(),
            "-U",
            "flowgate",
            "-d",
            db,
            "-tAc",
            sql,
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
