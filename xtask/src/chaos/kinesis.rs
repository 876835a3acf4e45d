//! The chaos run's Kinesis (the rig's kinesis-mock): a 2-shard stream, a boto3 producer
//! (`PutRecords`, failed entries sent again until accepted), checkpoints and leases in
//! PostgreSQL or Redis, and Kinesis's own API for the ledger: every record read from the start of each
//! shard, and `GetRecords` after each shard's stored checkpoint.
//!
//! The broker is never restarted in this run: kinesis-mock writes its state to disk every
//! 2 s, so a restart loses the records it accepted in the last seconds and hands their
//! sequence numbers out again — a loss of the mock, not of the pipeline, which the ledger
//! could not tell apart. Those cycles restart the store instead, and the run starts the mock
//! afresh keeping its streams in memory only (writing them to disk every 2 s keeps its one
//! thread busy as the stream grows).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::Target;
use crate::rig::{Broker, Rig};

const SHARDS: u32 = 2;
const ENDPOINT: &str = "http://127.0.0.1:4568";
/// Where the proxy in front of kinesis-mock listens.
const PROXY_PORT: u16 = 24_568;

/// The Kinesis calls the run makes, as one script: `create STREAM`, `delete STREAM`,
/// `produce STREAM` (numbers on standard input), `read STREAM` (every record's data, one per
/// line), `left STREAM SHARD=POSITION…` (records after each shard's checkpoint; a shard
/// without one counts from its start).
const SCRIPT: &str = r#"
import sys, time, boto3
from botocore.config import Config
cmd, endpoint, stream = sys.argv[1], sys.argv[2], sys.argv[3]
k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="flowgate", aws_secret_access_key="flowgate",
                 config=Config(retries={"max_attempts": 10, "mode": "standard"}))

def shards():
    return [s["ShardId"] for s in k.list_shards(StreamName=stream)["Shards"]]

def records(shard, after=None):
    if after is None:
        it = k.get_shard_iterator(StreamName=stream, ShardId=shard,
                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    else:
        it = k.get_shard_iterator(StreamName=stream, ShardId=shard,
                                  ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                  StartingSequenceNumber=after)["ShardIterator"]
    empty = 0
    while it and empty < 2:
        r = k.get_records(ShardIterator=it, Limit=10000)
        empty = 0 if r["Records"] else empty + 1
        for rec in r["Records"]:
            yield rec["Data"]
        it = r.get("NextShardIterator")

if cmd == "create":
    k.create_stream(StreamName=stream, ShardCount=int(sys.argv[4]))
    while k.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        time.sleep(0.1)
elif cmd == "delete":
    k.delete_stream(StreamName=stream, EnforceConsumerDeletion=True)
elif cmd == "produce":
    def put(batch):
        while batch:
            try:
                r = k.put_records(StreamName=stream, Records=[{"Data": n, "PartitionKey": n} for n in batch])
                batch = [n for n, e in zip(batch, r["Records"]) if "ErrorCode" in e]
            except Exception as e:
                print("put_records:", e, file=sys.stderr)
            if batch:
                time.sleep(0.2)
    batch, last = [], time.monotonic()
    for line in sys.stdin:
        n = line.strip()
        if n:
            batch.append(n)
        if len(batch) >= 500 or (batch and time.monotonic() - last > 0.1):
            put(batch)
            batch, last = [], time.monotonic()
    put(batch)
elif cmd == "read":
    out = sys.stdout
    for s in shards():
        for data in records(s):
            out.write(data.decode() + "\n")
elif cmd == "left":
    after = dict(a.split("=", 1) for a in sys.argv[4:])
    left = 0
    for s in shards():
        pos = after.get(s)
        # A position is the sequence number times 2^20 plus the sub-sequence.
        seq = None if pos is None else str(int(pos) >> 20)
        left += sum(1 for _ in records(s, seq))
    print(left)
"#;

pub(super) struct Kinesis;

impl Kinesis {
    fn script(&self, rig: &Rig, args: &[&str]) -> Result<Command, String> {
        let mut cmd = Command::new(rig.boto3_python()?);
        cmd.args(["-c", SCRIPT, args[0], ENDPOINT]).args(&args[1..]);
        Ok(cmd)
    }
}

impl Target for Kinesis {
    fn broker(&self) -> Broker {
        Broker::Kinesis
    }

    fn prepare(&self, rig: &Rig, stamp: u64) -> Result<String, String> {
        let stream = format!("chaos-{stamp}-{}", std::process::id());
        crate::run(
            "create the stream",
            &mut self.script(rig, &["create", &stream, &SHARDS.to_string()])?,
        )?;
        Ok(stream)
    }

    /// A short lease: a worker started again after a SIGKILL waits for its own leases to
    /// expire before it takes them.
    fn source(&self, stream: &str) -> String {
        format!(
            "[source]\ntype = \"kinesis\"\nstream = \"{stream}\"\nworker_id = \"chaos-worker\"\n\
             lease_ttl = \"3s\"\nshard_refresh = \"2s\"\nidle_backoff = \"200ms\"\n\
             connection = {{ endpoint_url = \"http://127.0.0.1:{PROXY_PORT}\", region = \"us-east-1\", \
             access_key_id = \"flowgate\", secret_access_key = \"flowgate\" }}"
        )
    }

    fn proxy(&self) -> (u16, u16) {
        (PROXY_PORT, 4568)
    }

    fn producer(&self, rig: &Rig, stream: &str, log: &Path) -> Result<Child, String> {
        self.script(rig, &["produce", stream])?
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start the boto3 producer: {e}"))
    }

    /// Every record in the stream, read from the start of each shard.
    fn accepted(&self, rig: &Rig, stream: &str, _fed: u64) -> Result<Vec<u64>, String> {
        let out = crate::output(&mut self.script(rig, &["read", stream])?)?;
        Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// `GetRecords` after each shard's checkpoint (read by `flowgate checkpoints show`, from
    /// whichever store the pipeline uses) returns nothing.
    fn consumed_to_end(&self, rig: &Rig, stream: &str, config: &Path) -> Result<bool, String> {
        let shown = crate::output(
            Command::new(rig.root().join("target/debug/flowgate"))
                .args(["checkpoints", "show", "-c"])
                .arg(config),
        )?;
        // `SHARD\tPOSITION[\tfence=N]` per line.
        let after: Vec<String> = shown
            .lines()
            .filter_map(|l| {
                let mut cols = l.split('\t');
                Some(format!("{}={}", cols.next()?, cols.next()?))
            })
            .collect();
        let mut args = vec!["left", stream];
        args.extend(after.iter().map(String::as_str));
        let left = crate::output(&mut self.script(rig, &args)?)?;
        Ok(left.trim() == "0")
    }

    fn needs_shared_store(&self) -> bool {
        true
    }

    fn broker_in_memory(&self) -> bool {
        true
    }

    /// kinesis-mock (one Node.js process) slows down as its stream grows: past some 50,000
    /// records on the 2-core machine its calls take seconds and then time out, for flowgate
    /// and the producer alike, and the run would measure the mock. At 50 records/s a
    /// 100-cycle run stays below that.
    fn max_rate(&self) -> u64 {
        50
    }

    fn cleanup(&self, rig: &Rig, stream: &str) -> Result<(), String> {
        crate::output(&mut self.script(rig, &["delete", stream])?).map(drop)
    }

    fn setup(&self) -> &'static str {
        "a 2-shard stream of kinesis-mock, one worker (a fixed worker id, 3 s leases); \
         the broker is not restarted (kinesis-mock loses its last seconds on a restart): those \
         cycles restart the store."
    }

    fn end_check(&self) -> &'static str {
        "nothing after each shard's checkpoint (Kinesis GetRecords)"
    }
}
