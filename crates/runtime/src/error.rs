//! Errors that know what to do next: a transient failure is retried and then redelivered, a
//! permanent one sends the message to the DLQ at once with its reason.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// What the runtime does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Throttling, 5xx, timeouts, connection errors: try again later.
    Transient,
    /// Bad input or an AWS refusal that will not change by itself: DLQ with the reason.
    Permanent,
}

/// A step's failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    #[error("transient: {0}")]
    Transient(String),
    #[error("permanent: {0}")]
    Permanent(String),
}

impl StepError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StepError::Transient(_))
    }

    /// The `amiflow-error-kind` value for this failure.
    pub fn kind(&self) -> &'static str {
        match self {
            StepError::Transient(_) => "transient-exhausted",
            StepError::Permanent(_) => "permanent",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            StepError::Transient(r) | StepError::Permanent(r) => r,
        }
    }

    /// Classify an SDK error; `action` names the API call (`ec2:ModifyImageAttribute`) so the
    /// reason tells a person which permission or input to look at.
    pub fn from_sdk<E>(action: &str, err: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let detail = describe(err);
        let code = err
            .as_service_error()
            .and_then(ProvideErrorMetadata::code)
            .unwrap_or_default();
        match classify(err) {
            ErrorClass::Transient => StepError::Transient(format!("{action}: {detail}")),
            // Said first: EC2's message can end in a long encoded authorization message, and the
            // DLQ attribute keeps only the first 4,000 characters.
            ErrorClass::Permanent if ACCESS_DENIED_CODES.contains(&code) => {
                StepError::Permanent(format!(
                    "{action}: {code}: this worker's role may not call {action}; allow it in the role's policy (and check SCPs and resource policies), then replay the message from the DLQ. AWS said: {}",
                    detail.strip_prefix(&format!("{code}: ")).unwrap_or(&detail)
                ))
            }
            ErrorClass::Permanent => StepError::Permanent(format!("{action}: {detail}")),
        }
    }
}

/// Codes with which AWS services refuse a caller that lacks a permission: EC2
/// (`UnauthorizedOperation`), query services such as Auto Scaling, STS and CloudFormation
/// (`AccessDenied`), JSON services such as SSM, KMS, EventBridge and SQS
/// (`AccessDeniedException`). Permanent: retrying cannot grant the permission.
const ACCESS_DENIED_CODES: &[&str] = &[
    "UnauthorizedOperation",
    "AccessDenied",
    "AccessDeniedException",
];

/// Error codes AWS services use for throttling and server-side trouble. Matched by code, never
/// by message text.
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "RequestThrottled",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
    "IDPCommunicationError",
];

/// Classify any SDK error.
pub fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> ErrorClass {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ErrorClass::Transient
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            if TRANSIENT_CODES.contains(&code) || service.raw().status().is_server_error() {
                ErrorClass::Transient
            } else {
                ErrorClass::Permanent
            }
        }
        _ => ErrorClass::Permanent,
    }
}

/// `Code: message` of an SDK error, or its display chain.
pub fn describe<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let SdkError::ServiceError(service) = err {
        let e = service.err();
        return match (e.code(), e.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => format!("{e}"),
        };
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    /// Send one PutEvents against a mocked reply and classify what comes back.
    async fn class_of(status: u16, body: &'static str) -> (ErrorClass, String) {
        let rule = mock!(aws_sdk_eventbridge::Client::put_events).then_http_response(move || {
            HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body))
        });
        let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, [&rule], |c| c
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled()));
        let err = client.put_events().send().await.unwrap_err();
        (
            classify(&err),
            StepError::from_sdk("events:PutEvents", &err).to_string(),
        )
    }

    #[tokio::test]
    async fn throttling_and_server_errors_are_transient() {
        let (class, text) = class_of(
            400,
            r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
        )
        .await;
        assert_eq!(class, ErrorClass::Transient);
        assert!(
            text.contains("events:PutEvents: ThrottlingException: Rate exceeded"),
            "{text}"
        );
        let (class, _) = class_of(503, r#"{"__type":"SomethingUnheardOf"}"#).await;
        assert_eq!(class, ErrorClass::Transient);
        let (class, _) = class_of(500, "<html>oops</html>").await;
        assert_eq!(class, ErrorClass::Transient);
    }

    #[tokio::test]
    async fn refusals_are_permanent_and_name_the_action() {
        let (class, text) = class_of(400, r#"{"__type":"AccessDeniedException","message":"not authorized to perform: events:PutEvents"}"#).await;
        assert_eq!(class, ErrorClass::Permanent);
        assert!(
            text.starts_with("permanent: events:PutEvents: AccessDeniedException: this worker's role may not call events:PutEvents;"),
            "{text}"
        );
        assert!(
            text.ends_with("AWS said: not authorized to perform: events:PutEvents"),
            "{text}"
        );
        let (class, _) = class_of(400, r#"{"__type":"ResourceNotFoundException","message":"Event bus amiflow does not exist."}"#).await;
        assert_eq!(class, ErrorClass::Permanent);
    }
}
