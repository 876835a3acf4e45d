//! The chaos run's Kafka: a 4-partition topic, Kafka's console producer (`acks=all`), a
//! static member reading it, and Kafka's own tools for the ledger.

use std::path::Path;
use std::process::{Child, Stdio};

use super::Target;
use crate::rig::{Broker, KAFKA_VIA_PROXY_PORT, Rig};

const PARTITIONS: u32 = 4;
const BOOTSTRAP: &str = "127.0.0.1:9092";

pub(super) struct Kafka;

impl Target for Kafka {
    fn broker(&self) -> Broker {
        Broker::Kafka
    }

    fn prepare(&self, rig: &Rig, stamp: u64) -> Result<String, String> {
        let topic = format!("chaos-{stamp}-{}", std::process::id());
        crate::run(
            "create the topic",
            &mut rig.kafka_topics(&[
                "--create",
                "--topic",
                &topic,
                "--partitions",
                &PARTITIONS.to_string(),
                "--replication-factor",
                "1",
            ]),
        )?;
        Ok(topic)
    }

    fn source(&self, topic: &str) -> String {
        format!(
            "[source]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:{KAFKA_VIA_PROXY_PORT}\"\n\
             topics = [\"{topic}\"]\ngroup_instance_id = \"chaos-member\"\nsession_timeout = \"10s\""
        )
    }

    /// The topic goes (a 100-cycle run leaves gigabytes); the group's offsets with it.
    fn cleanup(&self, rig: &Rig, topic: &str) -> Result<(), String> {
        crate::output(&mut rig.kafka_topics(&["--delete", "--topic", topic])).map(drop)
    }

    /// A dynamic member (no `group_instance_id`): it joins and leaves at once.
    fn churn_member_source(&self, topic: &str) -> Option<String> {
        Some(format!(
            "[source]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:{KAFKA_VIA_PROXY_PORT}\"\n\
             topics = [\"{topic}\"]\nsession_timeout = \"10s\""
        ))
    }

    /// The rig's listener advertised at the proxy's port, so every connection of the
    /// client goes through the proxy.
    fn proxy(&self) -> (u16, u16) {
        (KAFKA_VIA_PROXY_PORT, 9097)
    }

    fn producer(&self, rig: &Rig, topic: &str, log: &Path) -> Result<Child, String> {
        rig.kafka_console_producer(topic, log)
    }

    /// Every value the topic holds, read back with Kafka's console consumer.
    fn accepted(&self, rig: &Rig, topic: &str, _fed: u64) -> Result<Vec<u64>, String> {
        let out = rig
            .kafka_java(&rig.state_dir(Broker::Kafka))
            .args([
                "org.apache.kafka.tools.consumer.ConsoleConsumer",
                "--bootstrap-server",
                BOOTSTRAP,
                "--topic",
                topic,
                "--from-beginning",
                "--timeout-ms",
                "15000",
            ])
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run the console consumer: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// The group's committed offsets equal the log end of every partition, by Kafka's
    /// consumer-groups tool (the group is named after the topic).
    fn consumed_to_end(&self, rig: &Rig, topic: &str, _: &Path) -> Result<bool, String> {
        let out = rig
            .kafka_java(&rig.state_dir(Broker::Kafka))
            .args([
                "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                "--bootstrap-server",
                BOOTSTRAP,
                "--describe",
                "--group",
                topic,
            ])
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run kafka-consumer-groups: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut at_end = 0;
        for line in text.lines() {
            // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG …
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 6 && cols[0] == topic {
                if cols[3] != cols[4] {
                    return Ok(false);
                }
                at_end += 1;
            }
        }
        Ok(at_end == PARTITIONS)
    }

    fn setup(&self) -> &'static str {
        "4 partitions, static membership (session timeout 10 s), commits every 200 ms."
    }

    fn end_check(&self) -> &'static str {
        "committed offsets = log end (kafka-consumer-groups)"
    }
}
