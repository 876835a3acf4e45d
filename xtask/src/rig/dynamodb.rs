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
        self.python_with("import moto.server, werkzeug", "moto[server]", MOTO_VERSION)
    }

    /// A Python interpreter that imports boto3 (moto's, which depends on it).
    pub(crate) fn boto3_python(&self) -> Res<PathBuf> {
        self.python_with(
            "import moto.server, werkzeug, boto3",
            "moto[server]",
            MOTO_VERSION,
        )
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
