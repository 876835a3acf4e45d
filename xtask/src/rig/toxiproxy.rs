//! toxiproxy (network faults between flowgate and a broker), built from its Go module into
//! the rig's cache.

use super::*;

const TOXIPROXY_VERSION: &str = "2.5.0";

impl Rig {
    /// The toxiproxy server binary, installed with `go install` on first use.
    pub(crate) fn toxiproxy_server(&self) -> Res<PathBuf> {
        let dir = self.cache.join(format!("toxiproxy-{TOXIPROXY_VERSION}"));
        let server = dir.join("server");
        if !server.exists() {
            need_command("go", &["golang-go"])?;
            eprintln!(
                "    toxiproxy {TOXIPROXY_VERSION}: go install into {}",
                dir.display()
            );
            run_quiet(
                Command::new("go")
                    .env("GOBIN", &dir)
                    .arg("install")
                    .arg(format!(
                        "github.com/Shopify/toxiproxy/v2/cmd/server@v{TOXIPROXY_VERSION}"
                    ))
                    .arg(format!(
                        "github.com/Shopify/toxiproxy/v2/cmd/cli@v{TOXIPROXY_VERSION}"
                    )),
                "go install toxiproxy",
            )?;
        }
        Ok(server)
    }
}
