//! Debian's RabbitMQ, on loopback, with the management and stream plugins and a TLS listener.

use super::*;

/// pika, RabbitMQ's Python client, for the chaos run's producer.
const PIKA_VERSION: &str = "1.3.2";

impl Rig {
    /// A Python interpreter that imports pika (a `python3` that does, or a virtual
    /// environment in the rig's cache with the pinned version).
    pub(crate) fn pika_python(&self) -> Res<PathBuf> {
        self.python_with("import pika", "pika", PIKA_VERSION)
    }

    pub(super) fn start_rabbitmq(&self, dir: &Path) -> Res {
        // The node runs as the rig's user from the package's own bin directory: the
        // `/usr/sbin` wrapper switches to the `rabbitmq` user, which cannot read the rig's
        // files (its TLS key among them). Chosen after installing, so a fresh machine starts
        // the right one on the first run.
        const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
        if !Path::new(SERVER).exists() {
            apt_install(&["rabbitmq-server"])?;
        }
        let server = first_existing(&[SERVER]).ok_or_else(|| {
            format!("rabbitmq: installed rabbitmq-server but {SERVER} is missing")
        })?;
        need_command("epmd", &["erlang-base"])?;
        let tls = dir.join("tls");
        make_tls_certificates(&tls)?;
        let conf = format!(
            "listeners.tcp.default = 127.0.0.1:{RABBITMQ_PORT}\n\
             management.tcp.ip = 127.0.0.1\n\
             management.tcp.port = {RABBITMQ_MGMT_PORT}\n\
             stream.listeners.tcp.1 = 127.0.0.1:{RABBITMQ_STREAM_PORT}\n\
             stream.advertised_host = 127.0.0.1\n\
             collect_statistics_interval = 500\n\
             listeners.ssl.default = 127.0.0.1:{RABBITMQ_TLS_PORT}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            ca = tls.join("ca.pem").display(),
            cert = tls.join("server.pem").display(),
            key = tls.join("server.key").display(),
        );
        write(&dir.join("rabbitmq.conf"), &conf)?;
        write(
            &dir.join("enabled_plugins"),
            "[rabbitmq_management,rabbitmq_stream].\n",
        )?;
        // epmd first, as our own child, so that `down` can stop it by its PID.
        if self
            .pid(Broker::Rabbitmq, "epmd.pid")
            .filter(|p| alive(*p))
            .is_none()
            && !port_open(4369)
        {
            let mut epmd = Command::new("epmd");
            epmd.args(["-address", "127.0.0.1"]);
            self.spawn(
                Broker::Rabbitmq,
                "epmd.pid",
                &mut epmd,
                &dir.join("epmd.log"),
            )?;
            wait_until("epmd", Duration::from_secs(10), || Ok(port_open(4369)))?;
        }
        let mut cmd = Command::new(&server);
        self.rabbit_env(&mut cmd, dir);
        self.spawn(Broker::Rabbitmq, "pid", &mut cmd, &dir.join("stdout.log"))
    }

    pub(super) fn rabbit_env(&self, cmd: &mut Command, dir: &Path) {
        cmd.env("HOME", dir)
            .env("RABBITMQ_NODENAME", "rabbit@localhost")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", RABBITMQ_PORT.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
    }

    pub(crate) fn rabbitmqctl(&self, dir: &Path) -> Command {
        let ctl = first_existing(&["/usr/lib/rabbitmq/bin/rabbitmqctl"])
            .unwrap_or_else(|| "rabbitmqctl".into());
        let mut cmd = Command::new(ctl);
        self.rabbit_env(&mut cmd, dir);
        cmd.args(["-n", "rabbit@localhost"]);
        cmd
    }
}
