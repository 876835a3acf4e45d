//! The AWS SDK client, built from [`KinesisConnection`], and the records of the Kinesis
//! Producer Library it reads, split by [`kpl`].

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::Credentials;

use crate::KinesisConnection;

pub mod kpl;

/// A Kinesis client. The SDK's own retries are off: flowgate retries with its own backoff
/// and counts throttling, which the SDK would hide.
pub(crate) async fn build(c: &KinesisConnection) -> aws_sdk_kinesis::Client {
    let mut loader = aws_config::from_env()
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(c.call_timeout.unwrap_or(Duration::from_secs(10)))
                .connect_timeout(Duration::from_secs(3))
                .build(),
        );
    if let Some(region) = &c.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &c.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(
            id.clone(),
            secret.clone(),
            None,
            None,
            "flowgate-config",
        ));
    }
    aws_sdk_kinesis::Client::new(&loader.load().await)
}
