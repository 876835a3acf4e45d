//! Debian's Prometheus (promtool and the server), scraping a pipeline under test with the shipped rules.

use super::*;

impl Rig {
    /// Debian's `prometheus` package, unpacked into the cache without installing it (no
    /// service is started): `/usr/bin/prometheus` and `/usr/bin/promtool` under it.
    pub(crate) fn prometheus_tool(&self, tool: &str) -> Res<PathBuf> {
        let system = Path::new("/usr/bin").join(tool);
        if system.exists() {
            return Ok(system);
        }
        let dir = self.cache.join("prometheus");
        let bin = dir.join("root/usr/bin").join(tool);
        if bin.exists() {
            return Ok(bin);
        }
        need_command("apt-get", &[])?;
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        eprintln!("    prometheus: fetching Debian's package (promtool and the server)");
        run_quiet(
            Command::new("apt-get")
                .args(["download", "prometheus"])
                .current_dir(&dir),
            "apt-get download prometheus",
        )?;
        let deb = fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or("apt-get download prometheus left no .deb")?;
        run_quiet(
            Command::new("dpkg")
                .arg("-x")
                .arg(&deb)
                .arg(dir.join("root")),
            "dpkg -x prometheus",
        )?;
        let _ = fs::remove_file(&deb);
        if bin.exists() {
            Ok(bin)
        } else {
            Err(format!("the prometheus package has no {}", bin.display()))
        }
    }

    /// The server's config (scrape the pipeline under test every second, the shipped rules
    /// evaluated every second) and a copy of the rules, in `dir`.
    pub(super) fn prepare_prometheus(&self, dir: &Path) -> Res {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let rules = self.root.join("deploy/prometheus/flowgate-rules.yml");
        fs::copy(&rules, dir.join("flowgate-rules.yml"))
            .map_err(|e| format!("cannot copy {}: {e}", rules.display()))?;
        write(
            &dir.join("prometheus.yml"),
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - flowgate-rules.yml\n\
                 scrape_configs:\n  - job_name: flowgate\n    static_configs:\n      - targets: ['127.0.0.1:{PROMETHEUS_TARGET_PORT}']\n"
            ),
        )
    }

    pub(super) fn start_prometheus(&self, dir: &Path) -> Res {
        let bin = self.prometheus_tool("prometheus")?;
        self.prepare_prometheus(dir)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
        .arg("--storage.tsdb.retention.time=1h");
        self.spawn(
            Broker::Prometheus,
            "pid",
            &mut cmd,
            &dir.join("prometheus.log"),
        )
    }
}
