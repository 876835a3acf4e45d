//! The real-broker rig: Apache Kafka, RabbitMQ, Kinesis (kinesis-mock), PostgreSQL and Redis
//! on 127.0.0.1, as native processes (no Docker engine needed) or through docker compose.
//!
//! State (data, logs, PID files) lives in `target/flowgate-rig/<broker>/`; downloads (Kafka
//! jars, the kinesis-local npm package) in `$FLOWGATE_RIG_CACHE` (default
//! `~/.cache/flowgate-rig`), so a second `up` downloads nothing. `down` stops only the
//! processes whose PID files `up` wrote, never by name.
//!
//! `$FLOWGATE_RIG_KAFKA_LOG_DIR` puts the native Kafka broker's log (its topics' data)
//! elsewhere than `target/flowgate-rig/kafka/data`, until it is set again; on a RAM
//! filesystem (`/dev/shm/…`) the kernel's writeback of the log no longer shares the machine
//! with what a latency bench measures.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub(crate) const KAFKA_VERSION: &str = "4.1.1";
const KAFKA_CLUSTER_ID: &str = "4L6g3nShT-eMCtK--X86sw";
const KINESIS_LOCAL_VERSION: &str = "0.6.2";
const KAFKA_PORT: u16 = 9092;
const KAFKA_CONTROLLER_PORT: u16 = 9093;
/// TLS only (the rig's CA; a client certificate of it required).
const KAFKA_SSL_PORT: u16 = 9094;
/// SASL over TLS: SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN.
const KAFKA_SASL_SSL_PORT: u16 = 9095;
/// SASL without TLS.
const KAFKA_SASL_PLAINTEXT_PORT: u16 = 9096;
/// The SASL user the rig creates (SCRAM credentials and a PLAIN entry).
const KAFKA_SASL_USER: &str = "flowgate";
const KAFKA_SASL_PASSWORD: &str = "flowgate-rig-secret";
const RABBITMQ_PORT: u16 = 5672;
const RABBITMQ_MGMT_PORT: u16 = 15672;
const RABBITMQ_STREAM_PORT: u16 = 5552;
const RABBITMQ_TLS_PORT: u16 = 5671;
const KINESIS_PORT: u16 = 4568;
const KINESIS_TLS_PORT: u16 = 4567;
const POSTGRES_PORT: u16 = 15432;
const REDIS_PORT: u16 = 16379;
const REDIS_TLS_PORT: u16 = 16380;
const PROMETHEUS_PORT: u16 = 19090;
/// Where the rig's Prometheus scrapes a pipeline under test (`--metrics-addr`).
const PROMETHEUS_TARGET_PORT: u16 = 19464;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Broker {
    Kafka,
    Rabbitmq,
    Kinesis,
    Postgres,
    Redis,
    /// Not a broker: the Prometheus server that scrapes a pipeline under test with the shipped
    /// alert rules loaded.
    Prometheus,
}

pub(crate) const ALL: [Broker; 6] = [
    Broker::Kafka,
    Broker::Rabbitmq,
    Broker::Kinesis,
    Broker::Postgres,
    Broker::Redis,
    Broker::Prometheus,
];

impl Broker {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Broker::Kafka => "kafka",
            Broker::Rabbitmq => "rabbitmq",
            Broker::Kinesis => "kinesis",
            Broker::Postgres => "postgres",
            Broker::Redis => "redis",
            Broker::Prometheus => "prometheus",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Broker, String> {
        ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            format!(
                "unknown broker {s:?}: expected one of kafka, rabbitmq, kinesis, postgres, redis, prometheus"
            )
        })
    }

    /// The endpoints tests read, as `FLOWGATE_TEST_*` variables.
    pub(crate) fn env(self, rig: &Rig) -> Vec<(String, String)> {
        let v = |k: &str, val: String| (k.to_string(), val);
        match self {
            Broker::Kafka => vec![
                v(
                    "FLOWGATE_TEST_KAFKA_BOOTSTRAP",
                    format!("127.0.0.1:{KAFKA_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_CLASSPATH",
                    format!("{}/*", rig.kafka_jars().display()),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_SSL_BOOTSTRAP",
                    format!("127.0.0.1:{KAFKA_SSL_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_SASL_SSL_BOOTSTRAP",
                    format!("127.0.0.1:{KAFKA_SASL_SSL_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_SASL_PLAINTEXT_BOOTSTRAP",
                    format!("127.0.0.1:{KAFKA_SASL_PLAINTEXT_PORT}"),
                ),
                v("FLOWGATE_TEST_KAFKA_SASL_USER", KAFKA_SASL_USER.into()),
                v(
                    "FLOWGATE_TEST_KAFKA_SASL_PASSWORD",
                    KAFKA_SASL_PASSWORD.into(),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_CA",
                    rig.state_dir(Broker::Kafka)
                        .join("tls")
                        .join("ca.pem")
                        .display()
                        .to_string(),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_TLS_DIR",
                    rig.state_dir(Broker::Kafka)
                        .join("tls")
                        .display()
                        .to_string(),
                ),
            ],
            Broker::Rabbitmq => vec![
                v(
                    "FLOWGATE_TEST_RABBITMQ_URL",
                    format!("amqp://guest:guest@127.0.0.1:{RABBITMQ_PORT}/%2f"),
                ),
                v(
                    "FLOWGATE_TEST_RABBITMQ_MANAGEMENT",
                    format!("http://127.0.0.1:{RABBITMQ_MGMT_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_RABBITMQ_TLS_URL",
                    format!("amqps://guest:guest@127.0.0.1:{RABBITMQ_TLS_PORT}/%2f"),
                ),
                v(
                    "FLOWGATE_TEST_RABBITMQ_CA",
                    rig.state_dir(Broker::Rabbitmq)
                        .join("tls")
                        .join("ca.pem")
                        .display()
                        .to_string(),
                ),
            ],
            Broker::Kinesis => vec![v(
                "FLOWGATE_TEST_KINESIS_ENDPOINT",
                format!("http://127.0.0.1:{KINESIS_PORT}"),
            )],
            Broker::Postgres => vec![
                v(
                    "FLOWGATE_TEST_POSTGRES_URL",
                    format!("postgres://flowgate@127.0.0.1:{POSTGRES_PORT}/flowgate"),
                ),
                v(
                    "FLOWGATE_TEST_POSTGRES_CA",
                    rig.state_dir(Broker::Postgres)
                        .join("tls")
                        .join("ca.pem")
                        .display()
                        .to_string(),
                ),
            ],
            Broker::Redis => vec![
                v(
                    "FLOWGATE_TEST_REDIS_URL",
                    format!("redis://127.0.0.1:{REDIS_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_REDIS_TLS_URL",
                    format!("rediss://127.0.0.1:{REDIS_TLS_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_REDIS_CA",
                    rig.state_dir(Broker::Redis)
                        .join("tls")
                        .join("ca.pem")
                        .display()
                        .to_string(),
                ),
            ],
            Broker::Prometheus => vec![
                v(
                    "FLOWGATE_TEST_PROMETHEUS_URL",
                    format!("http://127.0.0.1:{PROMETHEUS_PORT}"),
                ),
                v(
                    "FLOWGATE_TEST_PROMETHEUS_TARGET",
                    format!("127.0.0.1:{PROMETHEUS_TARGET_PORT}"),
                ),
            ],
        }
    }

    fn ports(self) -> Vec<u16> {
        match self {
            Broker::Kafka => vec![
                KAFKA_PORT,
                KAFKA_CONTROLLER_PORT,
                KAFKA_SSL_PORT,
                KAFKA_SASL_SSL_PORT,
                KAFKA_SASL_PLAINTEXT_PORT,
            ],
            Broker::Rabbitmq => vec![
                RABBITMQ_PORT,
                RABBITMQ_MGMT_PORT,
                RABBITMQ_STREAM_PORT,
                RABBITMQ_TLS_PORT,
            ],
            Broker::Kinesis => vec![KINESIS_PORT, KINESIS_TLS_PORT],
            Broker::Postgres => vec![POSTGRES_PORT],
            Broker::Redis => vec![REDIS_PORT, REDIS_TLS_PORT],
            Broker::Prometheus => vec![PROMETHEUS_PORT],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    Native,
    Docker,
}

pub(crate) struct Rig {
    root: PathBuf,
    state: PathBuf,
    cache: PathBuf,
}

type Res<T = ()> = Result<T, String>;

impl Rig {
    pub(crate) fn new() -> Res<Rig> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let root = root
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
        let state = root.join("target").join("flowgate-rig");
        let cache = match std::env::var_os("FLOWGATE_RIG_CACHE") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/flowgate-rig"),
        };
        Ok(Rig { root, state, cache })
    }

    /// Where the native Kafka broker keeps its log: as its `server.properties` says (the last
    /// `up`), else where `up` would put it.
    /// The rig's own command-line client of `b`, connected to it: `rabbitmqctl` with the
    /// rig's node name and cookie, `psql` on its port and database, `redis-cli` on its port.
    pub(crate) fn client(&self, b: Broker) -> Res<Command> {
        Ok(match b {
            Broker::Rabbitmq => self.rabbitmqctl(&self.state_dir(b)),
            Broker::Postgres => {
                let mut c = Command::new("psql");
                c.args(["-h", "127.0.0.1", "-p", &POSTGRES_PORT.to_string()])
                    .args(["-U", "flowgate", "flowgate"]);
                c
            }
            Broker::Redis => {
                let mut c = Command::new("redis-cli");
                c.args(["-h", "127.0.0.1", "-p", &REDIS_PORT.to_string()]);
                c
            }
            other => {
                return Err(format!(
                    "no client for {}: use `cargo xtask kafka TOOL` for Kafka, the AWS CLI with --endpoint-url for Kinesis",
                    other.name()
                ));
            }
        })
    }

    pub(crate) fn kafka_log_dir(&self) -> PathBuf {
        let dir = self.state_dir(Broker::Kafka);
        fs::read_to_string(dir.join("server.properties"))
            .ok()
            .and_then(|p| {
                p.lines()
                    .find_map(|l| l.strip_prefix("log.dirs=").map(PathBuf::from))
            })
            .unwrap_or_else(|| dir.join("data"))
    }

    /// The workspace's root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn state_dir(&self, b: Broker) -> PathBuf {
        self.state.join(b.name())
    }

    fn kafka_jars(&self) -> PathBuf {
        self.cache
            .join(format!("kafka-{KAFKA_VERSION}"))
            .join("jars")
    }

    pub(crate) fn env_all(&self, brokers: &[Broker]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = brokers.iter().flat_map(|b| b.env(self)).collect();
        v.push((
            "FLOWGATE_TEST_RIG_STATE".into(),
            self.state.display().to_string(),
        ));
        v
    }

    pub(crate) fn default_engine() -> Engine {
        let docker = Command::new("docker")
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if docker {
            Engine::Docker
        } else {
            Engine::Native
        }
    }

    // ---- up ----------------------------------------------------------------------------

    pub(crate) fn up(&self, brokers: &[Broker], engine: Engine) -> Res {
        fs::create_dir_all(&self.state)
            .map_err(|e| format!("cannot create {}: {e}", self.state.display()))?;
        if engine == Engine::Docker {
            return self.docker_up(brokers);
        }
        for &b in brokers {
            let started = Instant::now();
            let what = match self.pid(b, "pid").filter(|p| alive(*p)) {
                Some(pid) => format!("already running (pid {pid})"),
                None => {
                    self.start(b)?;
                    "started".to_string()
                }
            };
            self.wait_ready(b)?;
            eprintln!(
                "    {:<9} {what}, ready in {:.1}s",
                b.name(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    fn start(&self, b: Broker) -> Res {
        let dir = self.state_dir(b);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for port in b.ports() {
            if port_open(port) {
                return Err(format!(
                    "{}: port 127.0.0.1:{port} is already taken by a process this rig did not start; stop it first",
                    b.name()
                ));
            }
        }
        match b {
            Broker::Kafka => self.start_kafka(&dir),
            Broker::Rabbitmq => self.start_rabbitmq(&dir),
            Broker::Kinesis => self.start_kinesis(&dir),
            Broker::Postgres => self.start_postgres(&dir),
            Broker::Redis => self.start_redis(&dir),
            Broker::Prometheus => self.start_prometheus(&dir),
        }
    }

    fn start_kafka(&self, dir: &Path) -> Res {
        self.ensure_kafka_jars()?;
        // `$FLOWGATE_RIG_KAFKA_LOG_DIR`, else the previous start's: a broker restarted by a
        // test (`up --only kafka`, without the variable) finds its topics again.
        let data = match std::env::var_os("FLOWGATE_RIG_KAFKA_LOG_DIR") {
            Some(p) if !p.is_empty() => std::path::absolute(&p).map_err(|e| {
                format!(
                    "FLOWGATE_RIG_KAFKA_LOG_DIR={}: not a usable path: {e}",
                    Path::new(&p).display()
                )
            })?,
            _ => self.kafka_log_dir(),
        };
        // TLS and SASL listeners beside the plain one, with a certificate of the rig's CA
        // (Kafka reads a PEM file holding the key and the chain).
        let tls = dir.join("tls");
        make_tls_certificates(&tls)?;
        let keystore = tls.join("kafka-keystore.pem");
        let read =
            |f: &str| fs::read_to_string(tls.join(f)).map_err(|e| format!("cannot read {f}: {e}"));
        write(
            &keystore,
            &format!("{}{}", read("server.key")?, read("server.pem")?),
        )?;
        let scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;";
        let plain = format!(
            "org.apache.kafka.common.security.plain.PlainLoginModule required user_{KAFKA_SASL_USER}=\"{KAFKA_SASL_PASSWORD}\";"
        );
        let mut sasl = String::from("sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512\n");
        for l in ["sasl_ssl", "sasl_plaintext"] {
            sasl.push_str(&format!(
                "listener.name.{l}.scram-sha-512.sasl.jaas.config={scram}\n\
                 listener.name.{l}.scram-sha-256.sasl.jaas.config={scram}\n\
                 listener.name.{l}.plain.sasl.jaas.config={plain}\n"
            ));
        }
        // `file.delete.delay.ms`: a deleted topic's files go after 1 s, not 60 s, so the
        // benches can drop each run's topic (gigabytes) before the next run starts.
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{KAFKA_CONTROLLER_PORT}\n\
             listeners=PLAINTEXT://127.0.0.1:{KAFKA_PORT},CONTROLLER://127.0.0.1:{KAFKA_CONTROLLER_PORT},\
             SSL://127.0.0.1:{KAFKA_SSL_PORT},SASL_SSL://127.0.0.1:{KAFKA_SASL_SSL_PORT},\
             SASL_PLAINTEXT://127.0.0.1:{KAFKA_SASL_PLAINTEXT_PORT}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{KAFKA_PORT},SSL://127.0.0.1:{KAFKA_SSL_PORT},\
             SASL_SSL://127.0.0.1:{KAFKA_SASL_SSL_PORT},SASL_PLAINTEXT://127.0.0.1:{KAFKA_SASL_PLAINTEXT_PORT}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,\
             SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             ssl.keystore.type=PEM\n\
             ssl.keystore.location={keystore}\n\
             ssl.truststore.type=PEM\n\
             ssl.truststore.location={ca}\n\
             listener.name.ssl.ssl.client.auth=required\n\
             {sasl}\
             log.dirs={data}\n\
             num.partitions=4\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=true\n\
             file.delete.delay.ms=1000\n",
            data = data.display(),
            keystore = keystore.display(),
            ca = tls.join("ca.pem").display(),
        );
        write(&dir.join("server.properties"), &props)?;
        let log4j = format!(
            "status = warn\n\
             appender.file.type = File\n\
             appender.file.name = file\n\
             appender.file.fileName = {}\n\
             appender.file.layout.type = PatternLayout\n\
             appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = info\n\
             rootLogger.appenderRef.file.ref = file\n",
            dir.join("server.log").display()
        );
        write(&dir.join("log4j2.properties"), &log4j)?;
        if !data.join("meta.properties").exists() {
            run_quiet(
                self.kafka_java(dir)
                    .args([
                        "kafka.tools.StorageTool",
                        "format",
                        "--standalone",
                        "-t",
                        KAFKA_CLUSTER_ID,
                        "-c",
                    ])
                    .arg(dir.join("server.properties")),
                "kafka storage format",
            )?;
        }
        let mut cmd = self.kafka_java(dir);
        // The heap and collector settings of Kafka's own launcher (`kafka-server-start.sh`,
        // `kafka-run-class.sh`): a fixed heap and G1 aiming at 20 ms pauses. With the JVM's
        // own defaults (a heap growing from 256 MB, 200 ms pause target) the broker collected
        // every second, ~8 ms each, under the latency bench; with these every 3–4 s, 6–9 ms.
        // Pauses are logged to `gc.log` in the broker's directory.
        cmd.args([
            "-Xms1g",
            "-Xmx1g",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
        ])
        .arg(format!(
            "-Xlog:gc:file={}:time,uptime:filecount=2,filesize=10M",
            dir.join("gc.log").display()
        ))
        .arg("kafka.Kafka")
        .arg(dir.join("server.properties"));
        self.spawn(Broker::Kafka, "pid", &mut cmd, &dir.join("stdout.log"))
    }

    /// Kafka's jars (broker and tools) in the cache, fetched with Maven once.
    fn ensure_kafka_jars(&self) -> Res {
        need_command("java", &["openjdk-17-jre-headless"])?;
        let jars = self.kafka_jars();
        if fs::read_dir(&jars).map(|d| d.count() > 10).unwrap_or(false) {
            return Ok(());
        }
        need_command("mvn", &["maven"])?;
        eprintln!(
            "    kafka     fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {}",
            jars.display()
        );
        let pom = self.root.join("xtask/rig/pom.xml");
        run_quiet(
            Command::new("mvn")
                .args(["-q", "-B", "-f"])
                .arg(&pom)
                .args([
                    "dependency:copy-dependencies",
                    &format!("-Dkafka.version={KAFKA_VERSION}"),
                    &format!("-DoutputDirectory={}", jars.display()),
                    "-DincludeScope=runtime",
                ]),
            "mvn dependency:copy-dependencies",
        )
    }

    /// `java` with the Kafka classpath and the rig's log4j2 configuration.
    pub(crate) fn kafka_java(&self, dir: &Path) -> Command {
        let mut cmd = Command::new("java");
        cmd.arg(format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", self.kafka_jars().display()));
        cmd
    }

    fn start_rabbitmq(&self, dir: &Path) -> Res {
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

    fn rabbit_env(&self, cmd: &mut Command, dir: &Path) {
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

    fn start_kinesis(&self, dir: &Path) -> Res {
        need_command("node", &["nodejs"])?;
        let pkg_dir = self
            .cache
            .join(format!("kinesis-local-{KINESIS_LOCAL_VERSION}"));
        let main = pkg_dir.join("node_modules/kinesis-local/main.js");
        if !main.exists() {
            need_command("npm", &["npm"])?;
            eprintln!(
                "    kinesis   installing kinesis-local@{KINESIS_LOCAL_VERSION} into {}",
                pkg_dir.display()
            );
            fs::create_dir_all(&pkg_dir)
                .map_err(|e| format!("cannot create {}: {e}", pkg_dir.display()))?;
            run_quiet(
                Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&pkg_dir)
                    .arg(format!("kinesis-local@{KINESIS_LOCAL_VERSION}")),
                "npm install kinesis-local",
            )?;
        }
        // kinesis-local hard-codes 0.0.0.0 as its bind host; keep it on loopback.
        let js = fs::read_to_string(&main)
            .map_err(|e| format!("cannot read {}: {e}", main.display()))?;
        const WILD: &str = r#"Host$().em("0.0.0.0")"#;
        const LOOP: &str = r#"Host$().em("127.0.0.1")"#;
        if js.contains(WILD) {
            write(&main, &js.replace(WILD, LOOP))?;
        } else if !js.contains(LOOP) {
            return Err(format!(
                "kinesis-local's bind-host pattern {WILD} was not found in {}: the package changed; \
                 the rig refuses to start it on 0.0.0.0",
                main.display()
            ));
        }
        let mut cmd = Command::new("node");
        cmd.arg(&main)
            .env(
                "KINESIS_MOCK_CERT_PATH",
                pkg_dir.join("node_modules/kinesis-local/server.json"),
            )
            .env("KINESIS_MOCK_PLAIN_PORT", KINESIS_PORT.to_string())
            .env("KINESIS_MOCK_TLS_PORT", KINESIS_TLS_PORT.to_string())
            .env("SHOULD_PERSIST_DATA", "true")
            .env("PERSIST_PATH", dir.join("data"))
            .env("PERSIST_INTERVAL", "2s")
            .env("CREATE_STREAM_DURATION", "200ms")
            .env("DELETE_STREAM_DURATION", "200ms")
            .env("UPDATE_SHARD_COUNT_DURATION", "200ms")
            // Every test makes its own stream and the state persists across runs: the default
            // account limit (50 open shards) would be reached after a few runs.
            .env("SHARD_LIMIT", "100000")
            .env("AWS_REGION", "us-east-1")
            .env("LOG_LEVEL", "WARN");
        self.spawn(Broker::Kinesis, "pid", &mut cmd, &dir.join("stdout.log"))
    }

    fn start_postgres(&self, dir: &Path) -> Res {
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

    fn start_redis(&self, dir: &Path) -> Res {
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
    fn prepare_prometheus(&self, dir: &Path) -> Res {
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

    fn start_prometheus(&self, dir: &Path) -> Res {
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

    fn spawn(&self, b: Broker, pid_file: &str, cmd: &mut Command, log: &Path) -> Res {
        let out =
            fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("{}: cannot start {:?}: {e}", b.name(), cmd.get_program()))?;
        write(&self.state_dir(b).join(pid_file), &child.id().to_string())
    }

    fn pid(&self, b: Broker, file: &str) -> Option<u32> {
        fs::read_to_string(self.state_dir(b).join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    // ---- readiness ---------------------------------------------------------------------

    pub(crate) fn wait_ready(&self, b: Broker) -> Res {
        let dir = self.state_dir(b);
        let timeout = Duration::from_secs(if b == Broker::Kafka || b == Broker::Rabbitmq {
            120
        } else {
            60
        });
        let check_alive = |what: &str| -> Res {
            match self.pid(b, "pid") {
                Some(pid) if !alive(pid) => Err(format!(
                    "{}: the process exited during start-up; see `cargo xtask brokers logs {}` ({what})",
                    b.name(),
                    b.name()
                )),
                _ => Ok(()),
            }
        };
        match b {
            // A metadata request through Kafka's own admin client, then the SASL user's
            // SCRAM credentials (idempotent: set again on every start).
            Broker::Kafka => {
                wait_until("kafka (metadata request)", timeout, || {
                    check_alive("kafka")?;
                    Ok(port_open(KAFKA_PORT)
                        && self
                            .kafka_java(&dir)
                            .args([
                                "org.apache.kafka.tools.TopicCommand",
                                "--bootstrap-server",
                                &format!("127.0.0.1:{KAFKA_PORT}"),
                                "--list",
                            ])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success()))
                })?;
                // One mechanism per request: the broker refuses two changes of one user's
                // credentials in the same request.
                for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
                    run_quiet(
                        self.kafka_java(&dir).args([
                            "kafka.admin.ConfigCommand",
                            "--bootstrap-server",
                            &format!("127.0.0.1:{KAFKA_PORT}"),
                            "--alter",
                            "--add-config",
                            &format!("{mechanism}=[password={KAFKA_SASL_PASSWORD}]"),
                            "--entity-type",
                            "users",
                            "--entity-name",
                            KAFKA_SASL_USER,
                        ]),
                        "kafka: creating the SCRAM user",
                    )?;
                }
                wait_until("kafka (TLS and SASL listeners)", timeout, || {
                    Ok(port_open(KAFKA_SSL_PORT)
                        && port_open(KAFKA_SASL_SSL_PORT)
                        && port_open(KAFKA_SASL_PLAINTEXT_PORT))
                })
            }
            Broker::Rabbitmq => wait_until("rabbitmq (await_startup)", timeout, || {
                check_alive("rabbitmq")?;
                Ok(self
                    .rabbitmqctl(&dir)
                    .args(["await_startup", "--timeout", "5"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
                    && port_open(RABBITMQ_PORT)
                    && port_open(RABBITMQ_STREAM_PORT)
                    && port_open(RABBITMQ_TLS_PORT))
            }),
            Broker::Kinesis => wait_until("kinesis (ListStreams)", timeout, || {
                check_alive("kinesis")?;
                Ok(kinesis_list_streams().is_ok())
            }),
            Broker::Postgres => wait_until("postgres (select 1)", timeout, || {
                check_alive("postgres")?;
                Ok(psql_db("flowgate", "select 1").is_ok_and(|o| o.trim() == "1"))
            }),
            Broker::Redis => wait_until("redis (PING)", timeout, || {
                check_alive("redis")?;
                Ok(redis_ping())
            }),
            Broker::Prometheus => wait_until("prometheus (/-/ready)", timeout, || {
                check_alive("prometheus")?;
                Ok(http_get_ok(PROMETHEUS_PORT, "/-/ready"))
            }),
        }
    }

    // ---- down / status / logs ----------------------------------------------------------

    pub(crate) fn down(&self, brokers: &[Broker]) -> Res {
        if self.docker_running() {
            return run_quiet(
                self.compose().args(["down", "--volumes"]),
                "docker compose down",
            );
        }
        let mut errors = Vec::new();
        for &b in brokers.iter().rev() {
            let dir = self.state_dir(b);
            if b == Broker::Rabbitmq && self.pid(b, "pid").is_some_and(alive) {
                // A clean stop flushes the message store; the PID below is the fallback.
                let _ = self
                    .rabbitmqctl(&dir)
                    .args(["stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            for file in ["pid", "epmd.pid"] {
                if let Some(pid) = self.pid(b, file) {
                    // PostgreSQL: SIGINT is its "fast" shutdown; the others stop on SIGTERM.
                    let sig = if b == Broker::Postgres { "INT" } else { "TERM" };
                    if let Err(e) = stop_pid(pid, sig, Duration::from_secs(20)) {
                        errors.push(format!("{}: {e}", b.name()));
                    }
                    let _ = fs::remove_file(dir.join(file));
                    eprintln!("    {:<9} stopped (pid {pid})", b.name());
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    pub(crate) fn status(&self) -> Res {
        for b in ALL {
            let state = match self.pid(b, "pid") {
                Some(pid) if alive(pid) => format!("running (pid {pid}), ports {:?}", b.ports()),
                Some(pid) => format!("dead (stale pid {pid})"),
                None => "stopped".to_string(),
            };
            println!("{:<9} {state}", b.name());
        }
        Ok(())
    }

    pub(crate) fn logs(&self, b: Broker) -> Res {
        let dir = self.state_dir(b);
        let files: Vec<PathBuf> = match b {
            Broker::Kafka => vec![dir.join("server.log"), dir.join("stdout.log")],
            Broker::Rabbitmq => {
                let mut v = vec![dir.join("stdout.log")];
                if let Ok(rd) = fs::read_dir(dir.join("log")) {
                    v.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
                }
                v
            }
            Broker::Kinesis => vec![dir.join("stdout.log")],
            Broker::Postgres => vec![dir.join("postgres.log")],
            Broker::Redis => vec![dir.join("redis.log")],
            Broker::Prometheus => vec![dir.join("prometheus.log")],
        };
        for f in files {
            if let Ok(text) = fs::read_to_string(&f) {
                let lines: Vec<&str> = text.lines().collect();
                println!("==> {} (last 200 lines)", f.display());
                for l in &lines[lines.len().saturating_sub(200)..] {
                    println!("{l}");
                }
            }
        }
        Ok(())
    }

    // ---- docker engine -----------------------------------------------------------------

    fn compose(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("compose")
            .arg("-f")
            .arg(self.root.join("docker-compose.yml"));
        cmd
    }

    fn docker_running(&self) -> bool {
        self.state.join("docker-engine").exists()
    }

    fn docker_up(&self, brokers: &[Broker]) -> Res {
        if brokers.contains(&Broker::Kafka) {
            // Kafka's command-line tools (consumer groups, perf tests) run from the same jars.
            self.ensure_kafka_jars()?;
        }
        if brokers.contains(&Broker::Prometheus) {
            // The compose service mounts this directory.
            self.prepare_prometheus(&self.state_dir(Broker::Prometheus))?;
        }
        let services: Vec<&str> = brokers.iter().map(|b| b.name()).collect();
        run_quiet(
            self.compose().args(["up", "-d", "--wait"]).args(&services),
            "docker compose up",
        )?;
        write(&self.state.join("docker-engine"), "1")?;
        for &b in brokers {
            match b {
                Broker::Kinesis => {
                    wait_until("kinesis (ListStreams)", Duration::from_secs(60), || {
                        Ok(kinesis_list_streams().is_ok())
                    })?
                }
                Broker::Redis => {
                    wait_until("redis (PING)", Duration::from_secs(60), || Ok(redis_ping()))?
                }
                // The compose file's health checks cover the others (metadata request,
                // await_startup, pg_isready).
                _ => {}
            }
        }
        Ok(())
    }
}

// ---- helpers ---------------------------------------------------------------------------

fn write(path: &Path, text: &str) -> Res {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn first_existing(paths: &[&str]) -> Option<String> {
    paths
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

fn has_apt() -> bool {
    Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn command_exists(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages when running as root with apt (CI); otherwise says what to run.
fn apt_install(packages: &[&str]) -> Res {
    if !(is_root() && has_apt()) {
        return Err(format!(
            "missing packages {packages:?}: install them with `sudo apt-get install -y {}`",
            packages.join(" ")
        ));
    }
    static UPDATED: OnceLock<()> = OnceLock::new();
    if UPDATED.get().is_none() {
        run_quiet(
            Command::new("apt-get").args(["update", "-qq"]),
            "apt-get update",
        )?;
        let _ = UPDATED.set(());
    }
    eprintln!("    installing {}", packages.join(" "));
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

pub(crate) fn need_command(name: &str, packages: &[&str]) -> Res {
    if command_exists(name) {
        return Ok(());
    }
    apt_install(packages)?;
    if command_exists(name) {
        Ok(())
    } else {
        Err(format!(
            "{name} is still missing after installing {packages:?}"
        ))
    }
}

fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn as_postgres(program: &Path) -> Command {
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

fn psql(sql: &str) -> Res<String> {
    psql_db("postgres", sql)
}

fn psql_db(db: &str, sql: &str) -> Res<String> {
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

/// A CA and a server certificate for 127.0.0.1 signed by it (`ca.pem`, `server.pem`,
/// `server.key`), made once with `openssl`.
/// The rig's own CA, a server certificate for 127.0.0.1/localhost and a client certificate
/// (`CN=flowgate`) for mutual TLS, each made once.
fn make_tls_certificates(dir: &Path) -> Res {
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

fn run_quiet(cmd: &mut Command, what: &str) -> Res {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; a zombie has exited.
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

fn stop_pid(pid: u32, sig: &str, grace: Duration) -> Res {
    if !alive(pid) {
        return Ok(());
    }
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    if alive(pid) {
        Err(format!("pid {pid} survived SIGKILL"))
    } else {
        Ok(())
    }
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> Res<bool>) -> Res {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{what} not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// `GET path` on 127.0.0.1:`port` answers 200.
fn http_get_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

fn redis_ping() -> bool {
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

/// A ListStreams call over plain HTTP (kinesis-mock accepts any credentials).
fn kinesis_list_streams() -> Res<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], KINESIS_PORT));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let body = "{}";
    let req = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{KINESIS_PORT}\r\nContent-Type: application/x-amz-json-1.1\r\n\
         X-Amz-Target: Kinesis_20131202.ListStreams\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=flowgate/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0\r\n\
         X-Amz-Date: 20260101T000000Z\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    if resp.starts_with("HTTP/1.1 200") {
        Ok(resp)
    } else {
        Err(resp.lines().next().unwrap_or("no answer").to_string())
    }
}
