//! The real-broker rig: Apache Kafka, RabbitMQ, Kinesis (kinesis-mock), PostgreSQL, Redis and
//! DynamoDB (moto's server) on 127.0.0.1, as native processes (no Docker engine needed) or
//! through docker compose.
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
//!
//! `$FLOWGATE_RIG_KAFKA_VERSION` runs another Apache Kafka release than [`KAFKA_VERSION`]
//! (e.g. `3.9.1`, `4.4.0`): its jars go to their own cache directory and its log to
//! `kafka/data-<version>`, so switching versions never hands one release another's log.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod dynamodb;
mod kafka;
mod kinesis;
mod postgres;
mod prometheus;
mod rabbitmq;
mod redis;
mod tls;
mod toxiproxy;

pub(crate) use kafka::CONSOLE_PRODUCER;
use kafka::{CONFIG_COMMAND, DUMP_LOG_SEGMENTS};
use kinesis::kinesis_list_streams;
use postgres::psql_db;
use redis::redis_ping;
use tls::make_tls_certificates;

/// The Apache Kafka the rig runs unless `$FLOWGATE_RIG_KAFKA_VERSION` names another.
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
/// A plain listener advertised at [`KAFKA_VIA_PROXY_PORT`]: a client bootstrapping through a
/// proxy listening there (the chaos run's toxiproxy) keeps every connection on the proxy.
const KAFKA_PROXIED_PORT: u16 = 9097;
/// Where the chaos run's toxiproxy listens for [`KAFKA_PROXIED_PORT`].
pub(crate) const KAFKA_VIA_PROXY_PORT: u16 = 29092;
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
const DYNAMODB_PORT: u16 = 15005;
/// moto, installed when no `moto_server` is on the PATH.
const MOTO_VERSION: &str = "5.2.5";
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
    /// DynamoDB, as moto's server mode serves it (a store, for the DynamoDB store's tests).
    Dynamodb,
    /// Not a broker: the Prometheus server that scrapes a pipeline under test with the shipped
    /// alert rules loaded.
    Prometheus,
}

/// The Apache Kafka release the rig runs: `$FLOWGATE_RIG_KAFKA_VERSION`, else [`KAFKA_VERSION`].
pub(crate) fn kafka_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        std::env::var("FLOWGATE_RIG_KAFKA_VERSION")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| KAFKA_VERSION.to_string())
    })
}

pub(crate) const ALL: [Broker; 7] = [
    Broker::Kafka,
    Broker::Rabbitmq,
    Broker::Kinesis,
    Broker::Postgres,
    Broker::Redis,
    Broker::Dynamodb,
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
            Broker::Dynamodb => "dynamodb",
            Broker::Prometheus => "prometheus",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Broker, String> {
        ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            format!(
                "unknown broker {s:?}: expected one of kafka, rabbitmq, kinesis, postgres, redis, dynamodb, prometheus"
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
                v("FLOWGATE_TEST_KAFKA_VERSION", kafka_version().to_string()),
                // Classes that moved between releases, as this release has them.
                v(
                    "FLOWGATE_TEST_KAFKA_CONSOLE_PRODUCER",
                    rig.kafka_class(CONSOLE_PRODUCER)
                        .unwrap_or(CONSOLE_PRODUCER[0])
                        .to_string(),
                ),
                v(
                    "FLOWGATE_TEST_KAFKA_DUMP_LOG_SEGMENTS",
                    rig.kafka_class(DUMP_LOG_SEGMENTS)
                        .unwrap_or(DUMP_LOG_SEGMENTS[0])
                        .to_string(),
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
            Broker::Dynamodb => vec![v(
                "FLOWGATE_TEST_DYNAMODB_ENDPOINT",
                format!("http://127.0.0.1:{DYNAMODB_PORT}"),
            )],
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
            Broker::Dynamodb => vec![DYNAMODB_PORT],
            Broker::Prometheus => vec![PROMETHEUS_PORT],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    Native,
    Docker,
}

#[derive(Clone)]
pub(crate) struct Rig {
    root: PathBuf,
    state: PathBuf,
    cache: PathBuf,
    /// kinesis-mock keeps its streams in memory only ([`Rig::with_kinesis_in_memory`]).
    kinesis_in_memory: bool,
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
        Ok(Rig {
            root,
            state,
            cache,
            kinesis_in_memory: false,
        })
    }

    /// The same rig, but a kinesis-mock it starts keeps its streams in memory only. By
    /// default it writes its whole state to disk every 2 s, so that a restarted mock finds its
    /// streams again; with a stream of hundreds of thousands of records that write keeps the
    /// mock's one thread busy and its calls time out.
    pub(crate) fn with_kinesis_in_memory(&self) -> Rig {
        Rig {
            kinesis_in_memory: true,
            ..self.clone()
        }
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

    /// The running (or last started) broker's log directory; for a first start of a
    /// version, `kafka/data` ([`KAFKA_VERSION`]) or `kafka/data-<version>`.
    pub(crate) fn kafka_log_dir(&self) -> PathBuf {
        let dir = self.state_dir(Broker::Kafka);
        let version = kafka_version();
        let props = fs::read_to_string(dir.join("server.properties")).unwrap_or_default();
        let same_version = props
            .lines()
            .any(|l| l.strip_prefix("# kafka.version=") == Some(version));
        props
            .lines()
            .filter(|_| same_version)
            .find_map(|l| l.strip_prefix("log.dirs=").map(PathBuf::from))
            .unwrap_or_else(|| match version {
                KAFKA_VERSION => dir.join("data"),
                v => dir.join(format!("data-{v}")),
            })
    }

    /// The workspace's root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn state_dir(&self, b: Broker) -> PathBuf {
        self.state.join(b.name())
    }

    /// Where downloads are kept (`$FLOWGATE_RIG_CACHE`, default `~/.cache/flowgate-rig`).
    pub(crate) fn cache(&self) -> &Path {
        &self.cache
    }

    fn kafka_jars(&self) -> PathBuf {
        self.cache
            .join(format!("kafka-{}", kafka_version()))
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
            Broker::Dynamodb => self.start_dynamodb(&dir),
            Broker::Prometheus => self.start_prometheus(&dir),
        }
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
                            self.kafka_class(CONFIG_COMMAND)?,
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
            Broker::Dynamodb => wait_until("dynamodb (moto /moto-api/)", timeout, || {
                check_alive("dynamodb")?;
                Ok(http_get_ok(DYNAMODB_PORT, "/moto-api/"))
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
            Broker::Dynamodb => vec![dir.join("moto.log")],
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
                Broker::Dynamodb => wait_until("dynamodb (moto)", Duration::from_secs(60), || {
                    Ok(http_get_ok(DYNAMODB_PORT, "/moto-api/"))
                })?,
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

impl Rig {
    /// A Python interpreter for which `check` (e.g. `import pika`) succeeds: a `python3` on
    /// the PATH, else a virtual environment in the rig's cache with `package==version`
    /// installed (made once).
    fn python_with(&self, check: &str, package: &str, version: &str) -> Res<PathBuf> {
        let imports = |python: &Path| {
            Command::new(python)
                .args(["-c", check])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if imports(Path::new("python3")) {
            return Ok(PathBuf::from("python3"));
        }
        let name = package.split('[').next().unwrap_or(package);
        let venv = self.cache.join(format!("{name}-{version}"));
        let bin = venv.join("bin/python");
        if !imports(&bin) {
            need_command("python3", &["python3", "python3-venv"])?;
            eprintln!(
                "    python    installing {package}=={version} into {}",
                venv.display()
            );
            run_quiet(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                &format!("python3 -m venv (for {name})"),
            )?;
            run_quiet(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet"])
                    .arg(format!("{package}=={version}")),
                &format!("pip install {package}"),
            )?;
        }
        Ok(bin)
    }
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
    http("GET", port, path, &[], "").is_ok_and(|(status, _)| status == 200)
}

/// One HTTP/1.0 request to 127.0.0.1:`port`: the answer's status code and body.
pub(crate) fn http(
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Res<(u16, String)> {
    let fail = |e: std::io::Error| format!("{method} 127.0.0.1:{port}{path}: {e}");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    let mut request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    s.write_all(request.as_bytes()).map_err(fail)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(fail)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} 127.0.0.1:{port}{path}: not an HTTP answer"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |b| b.1);
    Ok((status, body.to_string()))
}
