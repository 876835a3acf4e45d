//! The RabbitMQ contenders, each draining its own queue filled beforehand with the same
//! records by the raw lapin publisher of the RabbitMQ bench: `flowgate run` (RabbitMQ source →
//! JSON-lines file), RabbitMQ's PerfTest, and the RabbitMQ bench's raw lapin consumer.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::kafka::{self, Ctx};
use super::measure::{self, Sample, Writer};
use crate::rig::Broker;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub(super) struct Rabbit<'a> {
    pub(super) ctx: &'a Ctx<'a>,
    pub(super) bench: PathBuf,
    /// PerfTest's jars, when they could be fetched.
    pub(super) perf_test: Option<PathBuf>,
}

impl Rabbit<'_> {
    /// A fresh durable queue holding `records` messages of 100 bytes.
    pub(super) fn fill(&self, queue: &str, records: u64) -> Result<(), String> {
        crate::output(
            Command::new(&self.bench)
                .args(["publish-raw", queue, &records.to_string()])
                .env("FLOWGATE_TEST_RABBITMQ_URL", URL),
        )
        .map(|_| ())
    }

    pub(super) fn delete(&self, queue: &str) {
        if let Ok(mut cmd) = self.ctx.rig.client(Broker::Rabbitmq) {
            let _ = cmd
                .args(["delete_queue", queue])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    pub(super) fn flowgate(&self, queue: &str, records: u64) -> Result<Sample, String> {
        let dir = self.ctx.run_dir("rabbitmq-flowgate")?;
        let out = dir.join("out.jsonl");
        let config = dir.join("pipeline.toml");
        kafka::write(&config, &config_text(&dir, queue, &out))?;
        let w = Writer {
            name: "flowgate (RabbitMQ)",
            out: &out,
            records,
            timeout: Duration::from_secs(600),
        };
        let mut cmd = kafka::flowgate_cmd(self.ctx, &config, &dir.join("log"))?;
        let s = measure::measure_writer(&w, &mut cmd);
        let _ = std::fs::remove_dir_all(&dir);
        s
    }

    /// PerfTest as a consumer only (`-x 0 -y 1`) of the pre-declared queue, prefetch 300, one
    /// `multiple` ack per 100 messages, stopping after `records`: the rate from the process's
    /// start to its exit, and its own "receiving rate avg" as the steady rate.
    pub(super) fn perf_test(
        &self,
        jars: &Path,
        queue: &str,
        records: u64,
    ) -> Result<Sample, String> {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{}/*", jars.display()))
            .arg("com.rabbitmq.perf.PerfTest")
            .args(["-h", URL, "-x", "0", "-y", "1", "-u", queue, "-p"])
            .args([
                "-q",
                "300",
                "-A",
                "100",
                "-D",
                &records.to_string(),
                "-z",
                "600",
            ]);
        let started = Instant::now();
        let (out, cpu, rss) = measure::run_tool(&mut cmd, "PerfTest")?;
        let secs = started.elapsed().as_secs_f64();
        let steady = out
            .lines()
            .find_map(|l| l.split("receiving rate avg:").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse::<f64>().ok())
            .ok_or_else(|| format!("PerfTest: no \"receiving rate avg\" in {out:?}"))?;
        Ok(Sample {
            rate: records as f64 / secs,
            steady,
            cpu_per_m: cpu * 1e6 / records as f64,
            rss_mib: rss,
            records,
        })
    }

    /// The RabbitMQ bench's raw lapin consumer, prefetch 300, one `multiple` ack per 100.
    pub(super) fn raw(&self, queue: &str, records: u64) -> Result<Sample, String> {
        let mut cmd = Command::new(&self.bench);
        cmd.args(["consume-raw-batched", queue, &records.to_string()])
            .env("FLOWGATE_TEST_RABBITMQ_URL", URL);
        let started = Instant::now();
        let (out, cpu, rss) = measure::run_tool(&mut cmd, "bench_rabbitmq consume-raw-batched")?;
        let secs = started.elapsed().as_secs_f64();
        // `mode records seconds rate`
        let rate = out
            .split_whitespace()
            .nth(3)
            .and_then(|r| r.parse::<f64>().ok())
            .ok_or_else(|| format!("bench_rabbitmq: unexpected output {out:?}"))?;
        Ok(Sample {
            rate: records as f64 / secs,
            steady: rate,
            cpu_per_m: cpu * 1e6 / records as f64,
            rss_mib: rss,
            records,
        })
    }
}

fn config_text(dir: &Path, queue: &str, out: &Path) -> String {
    format!(
        "name = \"{queue}\"\n\n[source]\ntype = \"rabbitmq\"\nurl = \"{URL}\"\nqueue = \"{queue}\"\n\n\
         [sink]\ntype = \"jsonl\"\npath = \"{}\"\n\n[store]\ntype = \"embedded\"\npath = \"{}\"\n",
        out.display(),
        dir.join("data").display()
    )
}
