//! Apache Kafka from Maven Central jars (KRaft, one node), with its SSL, SASL_SSL and SASL_PLAINTEXT listeners.

use super::*;
use std::collections::HashMap;
use std::sync::Mutex;

impl Rig {
    pub(super) fn start_kafka(&self, dir: &Path) -> Res {
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
            "# kafka.version={version}\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{KAFKA_CONTROLLER_PORT}\n\
             listeners=PLAINTEXT://127.0.0.1:{KAFKA_PORT},CONTROLLER://127.0.0.1:{KAFKA_CONTROLLER_PORT},\
             SSL://127.0.0.1:{KAFKA_SSL_PORT},SASL_SSL://127.0.0.1:{KAFKA_SASL_SSL_PORT},\
             SASL_PLAINTEXT://127.0.0.1:{KAFKA_SASL_PLAINTEXT_PORT},PROXIED://127.0.0.1:{KAFKA_PROXIED_PORT}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{KAFKA_PORT},SSL://127.0.0.1:{KAFKA_SSL_PORT},\
             SASL_SSL://127.0.0.1:{KAFKA_SASL_SSL_PORT},SASL_PLAINTEXT://127.0.0.1:{KAFKA_SASL_PLAINTEXT_PORT},\
             PROXIED://127.0.0.1:{KAFKA_VIA_PROXY_PORT}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,\
             SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,PROXIED:PLAINTEXT\n\
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
            version = kafka_version(),
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
    pub(super) fn ensure_kafka_jars(&self) -> Res {
        need_command("java", &["openjdk-17-jre-headless"])?;
        let jars = self.kafka_jars();
        if fs::read_dir(&jars).map(|d| d.count() > 10).unwrap_or(false) {
            return Ok(());
        }
        need_command("mvn", &["maven"])?;
        eprintln!(
            "    kafka     fetching Apache Kafka {} jars from Maven Central into {}",
            kafka_version(),
            jars.display()
        );
        let pom = self.root.join("xtask/rig/pom.xml");
        run_quiet(
            Command::new("mvn")
                .args(["-q", "-B", "-f"])
                .arg(&pom)
                .args([
                    "dependency:copy-dependencies",
                    &format!("-Dkafka.version={}", kafka_version()),
                    &format!("-DoutputDirectory={}", jars.display()),
                    "-DincludeScope=runtime",
                ]),
            "mvn dependency:copy-dependencies",
        )
    }

    /// Kafka's topics tool against the rig's broker, e.g. `["--create", "--topic", t, …]`.
    pub(crate) fn kafka_topics(&self, args: &[&str]) -> Command {
        let mut cmd = self.kafka_java(&self.state_dir(Broker::Kafka));
        cmd.args([
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            "127.0.0.1:9092",
        ])
        .args(args);
        cmd
    }

    /// Kafka's console producer (`acks=all`) writing each line of its standard input to
    /// `topic`, its messages in `log`.
    pub(crate) fn kafka_console_producer(&self, topic: &str, log: &Path) -> Res<Child> {
        self.kafka_java(&self.state_dir(Broker::Kafka))
            .args([
                self.kafka_class(CONSOLE_PRODUCER)?,
                "--bootstrap-server",
                "127.0.0.1:9092",
                "--topic",
                topic,
                "--producer-property",
                "acks=all",
                "--producer-property",
                "delivery.timeout.ms=120000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?)
            .spawn()
            .map_err(|e| format!("cannot start Kafka's console producer: {e}"))
    }

    /// The first of `candidates` (fully qualified class names) that the release's Kafka jars
    /// hold: Kafka's tools move between its jars from release to release. Looked up once per
    /// release and class.
    pub(crate) fn kafka_class(&self, candidates: &[&'static str]) -> Res<&'static str> {
        static FOUND: OnceLock<Mutex<HashMap<(String, &'static str), &'static str>>> =
            OnceLock::new();
        let found = FOUND.get_or_init(Default::default);
        let key = (
            kafka_version().to_string(),
            candidates.first().copied().unwrap_or(""),
        );
        if let Some(class) = found.lock().ok().and_then(|f| f.get(&key).copied()) {
            return Ok(class);
        }
        let dir = self.kafka_jars();
        let hint = "run `cargo xtask brokers up --only kafka` first, which fetches them";
        let mut jars = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| format!("{}: {e} ({hint})", dir.display()))? {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with("kafka") && n.ends_with(".jar")) {
                jars.push(fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?);
            }
        }
        let class = candidates
            .iter()
            .find(|class| {
                let entry = format!("{}.class", class.replace('.', "/"));
                jars.iter().any(|jar| names_entry(jar, entry.as_bytes()))
            })
            .copied()
            .ok_or_else(|| {
                format!(
                    "none of {candidates:?} is in Kafka {}'s jars ({}; {hint})",
                    kafka_version(),
                    dir.display()
                )
            })?;
        if let Ok(mut f) = found.lock() {
            f.insert(key, class);
        }
        Ok(class)
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
}

/// Kafka's console producer: in its tools jar since 4.0, in its core jar before.
pub(crate) const CONSOLE_PRODUCER: &[&str] = &[
    "org.apache.kafka.tools.ConsoleProducer",
    "kafka.tools.ConsoleProducer",
];

/// Kafka's log segment dumper: in its tools jar in 4.x, in its core jar before.
pub(crate) const DUMP_LOG_SEGMENTS: &[&str] = &[
    "org.apache.kafka.tools.DumpLogSegments",
    "kafka.tools.DumpLogSegments",
];

/// Kafka's config tool: in its tools jar in 4.x, in its core jar before.
pub(crate) const CONFIG_COMMAND: &[&str] = &[
    "org.apache.kafka.tools.ConfigCommand",
    "kafka.admin.ConfigCommand",
];

/// The jar names `entry` (a jar names its entries uncompressed, in its local headers and its
/// central directory): a whole name, not the tail of a longer path.
fn names_entry(jar: &[u8], entry: &[u8]) -> bool {
    let first = entry.first().copied().unwrap_or(0);
    jar.iter().enumerate().any(|(i, b)| {
        *b == first && jar.get(i..i + entry.len()) == Some(entry) && (i == 0 || jar[i - 1] != b'/')
    })
}
