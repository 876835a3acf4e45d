//! Helpers of the rig smoke tests: the endpoints `cargo xtask brokers up` prints.
//!
//! Every helper fails loudly when its variable is missing: a broker test that runs must have
//! its broker, never skip.

/// The value of a `FLOWGATE_TEST_*` variable, or a panic saying how to get it.
pub fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: start the brokers with `cargo xtask brokers up` and export what it \
             prints (or run everything with `cargo xtask test`)"
        )
    })
}

/// A name unique to this test run, for topics, queues and streams.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}
