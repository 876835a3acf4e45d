//! The chaos run's RabbitMQ: a durable classic queue, a pika producer publishing each number
//! as a persistent message with publisher confirms (reconnecting and publishing again while
//! the broker is away), and `rabbitmqctl list_queues` for the ledger.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::Target;
use crate::rig::{Broker, Rig};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The producer: one persistent message per line of standard input, its number also its
/// `message_id`, confirmed by the broker before the next; a failed publish is retried on a new
/// connection until confirmed, so every number given is accepted (some perhaps twice, under
/// the same message id).
const PRODUCER: &str = r#"
import sys, time, pika
url, queue = sys.argv[1], sys.argv[2]
def connect():
    while True:
        try:
            c = pika.BlockingConnection(pika.URLParameters(url))
            ch = c.channel()
            ch.confirm_delivery()
            ch.queue_declare(queue=queue, durable=True)
            return c, ch
        except Exception:
            time.sleep(0.5)
conn, ch = connect()
for line in sys.stdin:
    body = line.strip()
    if not body:
        continue
    props = pika.BasicProperties(delivery_mode=2, message_id=body)
    while True:
        try:
            ch.basic_publish(exchange="", routing_key=queue, body=body, properties=props, mandatory=True)
            break
        except Exception:
            try:
                conn.close()
            except Exception:
                pass
            conn, ch = connect()
conn.close()
"#;

pub(super) struct Rabbitmq;

impl Target for Rabbitmq {
    fn broker(&self) -> Broker {
        Broker::Rabbitmq
    }

    fn prepare(&self, rig: &Rig, stamp: u64) -> Result<String, String> {
        let queue = format!("chaos-{stamp}-{}", std::process::id());
        let python = rig.pika_python()?;
        crate::run(
            "declare the queue",
            Command::new(python).args([
                "-c",
                "import sys, pika\nc = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))\nc.channel().queue_declare(queue=sys.argv[2], durable=True)\nc.close()",
                URL,
                &queue,
            ]),
        )?;
        Ok(queue)
    }

    fn source(&self, queue: &str) -> String {
        let url = URL.replace(":5672/", &format!(":{}/", self.proxy().0));
        format!("[source]\ntype = \"rabbitmq\"\nurl = \"{url}\"\nqueue = \"{queue}\"")
    }

    fn proxy(&self) -> (u16, u16) {
        (35_672, 5_672)
    }

    fn producer(&self, rig: &Rig, queue: &str, log: &Path) -> Result<Child, String> {
        Command::new(rig.pika_python()?)
            .args(["-c", PRODUCER, URL, queue])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start the pika producer: {e}"))
    }

    /// The producer publishes every number it is given until the broker confirms it.
    fn accepted(&self, _rig: &Rig, _queue: &str, fed: u64) -> Result<Vec<u64>, String> {
        Ok((0..fed).collect())
    }

    /// The queue holds no message, ready or unacknowledged (`rabbitmqctl list_queues`).
    fn consumed_to_end(&self, rig: &Rig, queue: &str, _: &Path) -> Result<bool, String> {
        let out = rig
            .client(Broker::Rabbitmq)?
            .args([
                "list_queues",
                "-q",
                "name",
                "messages",
                "messages_unacknowledged",
            ])
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() == 3 && cols[0] == queue && cols[1] == "0" && cols[2] == "0"
        }))
    }

    /// The message id the producer set (the source makes it the record's idempotency key,
    /// which wins over any extractor).
    fn dedup_key(&self) -> &'static str {
        "key"
    }

    fn setup(&self) -> &'static str {
        "a durable classic queue, the producer's message id on every message, prefetch from the \
         runtime's in-flight limit, acknowledgements after the sink's write."
    }

    fn end_check(&self) -> &'static str {
        "queue empty, nothing unacknowledged (rabbitmqctl list_queues)"
    }
}
