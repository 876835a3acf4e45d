//! AWS SDK errors mapped onto flowgate's error kinds, in one place.

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use flowgate_core::{Error, ErrorKind};

/// The Kinesis error code of a failed call (`ProvisionedThroughputExceededException`, …), if
/// the service answered.
pub(crate) fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<String> {
    match e {
        SdkError::ServiceError(s) => s.err().code().map(str::to_string),
        _ => None,
    }
}

/// The kind of a Kinesis error code.
pub(crate) fn kind_of_code(code: Option<&str>) -> ErrorKind {
    match code {
        Some(
            "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "KMSThrottlingException"
            | "ThrottlingException",
        ) => ErrorKind::Throttled,
        Some(
            "ResourceNotFoundException"
            | "AccessDeniedException"
            | "KMSAccessDeniedException"
            | "KMSDisabledException"
            | "KMSNotFoundException"
            | "KMSInvalidStateException"
            | "KMSOptInRequired"
            | "UnrecognizedClientException"
            | "InvalidSignatureException",
        ) => ErrorKind::Config,
        Some("InvalidArgumentException" | "ValidationException") => ErrorKind::Fatal,
        _ => ErrorKind::Transient,
    }
}

/// Maps an SDK error onto a flowgate error of the right kind, naming what failed.
pub(crate) fn map<E, R>(e: SdkError<E, R>, what: &'static str, stream: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = code(&e);
    let kind = kind_of_code(code.as_deref());
    let mut err = Error::new(kind, format!("kinesis: {what} failed"))
        .with_context("stream", stream)
        .with_context("cause", DisplayErrorContext(&e));
    if kind == ErrorKind::Config {
        err = err.with_hint(
            "check the stream name, region, endpoint_url and credentials (and the IAM permissions)",
        );
    }
    err
}
