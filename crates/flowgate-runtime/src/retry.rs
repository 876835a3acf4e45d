//! The runtime's retries of one-off calls (checkpoint loads and commits, dedup checks and
//! marks, transforms): core's [`Backoff`](flowgate_core::retry::Backoff) with the pipeline's
//! retry settings, so they grow, cap and give up as the sink's retries do.

use std::future::Future;

use flowgate_core::Error;
use flowgate_core::retry::Backoff;

use crate::settings::RetrySettings;

/// Retries an operation while it fails with a temporary error, with the runtime's backoff.
pub(crate) async fn retry_temporary<T, F, Fut>(
    retry: &RetrySettings,
    what: &'static str,
    mut op: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    // The budget runs from the first failure: a wait before the first attempt (a sink
    // holding its requests for another partition's `Retry-After`) spends none of it.
    let mut failing: Option<Backoff> = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_temporary() => match failing
                .get_or_insert_with(|| retry.policy().start())
                .delay_after(&e)
            {
                Some(d) => {
                    tracing::warn!(error = %e, delay = ?d, "{what} failed, retrying");
                    tokio::time::sleep(d).await;
                }
                None => {
                    let spent = failing.as_ref().map(Backoff::elapsed).unwrap_or_default();
                    return Err(e.with_context("gave_up_after", format!("{spent:?}")));
                }
            },
            Err(e) => return Err(e),
        }
    }
}
