//! moto's server mode (PyPI `moto[server]`) for the DynamoDB store: on loopback, in memory.
//! A `python3` that imports moto is used as it is; otherwise the pinned version is installed
//! into a virtual environment in the rig's cache.
//!
//! The server answers one request at a time: in moto's threaded mode two concurrent
//! conditional writes on one item can both succeed (two racers won an
//! `attribute_not_exists` lease), which DynamoDB itself never allows.

use super::*;

impl Rig {
    /// A Python interpreter that imports moto's server.
    fn moto_python(&self) -> Res<PathBuf> {
        let imports = |python: &Path| {
            Command::new(python)
                .args(["-c", "import moto.server, werkzeug"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if imports(Path::new("python3")) {
            return Ok(PathBuf::from("python3"));
        }
        let venv = self.cache.join(format!("moto-{MOTO_VERSION}"));
        let bin = venv.join("bin/python");
        if !bin.exists() {
            need_command("python3", &["python3", "python3-venv"])?;
            eprintln!(
                "    dynamodb  installing moto[server]=={MOTO_VERSION} into {}",
                venv.display()
            );
            run_quiet(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv (for moto)",
            )?;
            run_quiet(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet"])
                    .arg(format!("moto[server]=={MOTO_VERSION}")),
                "pip install moto[server]",
            )?;
        }
        Ok(bin)
    }

    pub(super) fn start_dynamodb(&self, dir: &Path) -> Res {
        let python = self.moto_python()?;
        let mut cmd = Command::new(python);
        cmd.args([
            "-c",
            "import sys\n\
             from moto.server import DomainDispatcherApplication, create_backend_app\n\
             from werkzeug.serving import run_simple\n\
             run_simple('127.0.0.1', int(sys.argv[1]), \
             DomainDispatcherApplication(create_backend_app), threaded=False)",
            &DYNAMODB_PORT.to_string(),
        ])
        .env("MOTO_PORT", DYNAMODB_PORT.to_string());
        self.spawn(Broker::Dynamodb, "pid", &mut cmd, &dir.join("moto.log"))
    }
}
