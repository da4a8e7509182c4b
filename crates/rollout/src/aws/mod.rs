//! Narrow capabilities over AWS, one trait per thing a step needs (not per SDK client), each with
//! a real implementation that is a few lines over the SDK. Steps take `&impl Trait`, so their
//! logic is unit-tested with in-memory fakes and the SDK replies with `aws-smithy-mocks`.
//!
//! Idempotent AWS answers ("already shared", "no updates are to be performed") are turned into
//! success here, matched by error code, never by message text.
//!
//! One module per capability, each trait next to its SDK implementation and the rate-limit waits
//! (`runtime::limits`) of the calls it makes: `images`, `keys`, `parameters`, `groups`, `templates`
//! (launch template versions), `stacks`, `tags` (tag writes shared across steps), `marks`
//! (where the refresh-worker's marks are kept: tags, or SSM for stack-owned groups) and `records`
//! (amiflow's own JSON records in Parameter Store: promotions, pauses, approvals).

mod groups;
mod images;
mod keys;
mod marks;
mod parameters;
mod records;
mod stacks;
mod tags;
mod templates;

pub use groups::{
    AwsGroups, Group, Groups, Instance, LaunchSource, LaunchedFrom, Refresh, RefreshRequest,
    desired_version,
};
pub use images::{Ec2Images, IMAGE_BUILDER_TAG, Image, Images};
pub use keys::{Keys, KmsKeys};
pub use marks::{
    MARKS_PATH, MarkParameters, MarkPlace, MarkStates, MarkStore, Marks, ParameterMarks, TagMarks,
    parameter_name,
};
pub use parameters::{ParamValue, Parameters, SsmParameters};
pub use records::{Records, SsmRecords, StoredRecord};
pub use stacks::{CfnStacks, STACK_TAG, Stack, Stacks};
pub use tags::TagBatch;
pub use templates::{ListedVersion, TemplateVersion, Templates};

use aws_smithy_types::error::metadata::ProvideErrorMetadata;

fn code_of<E: ProvideErrorMetadata, R>(
    e: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

/// A worker whose role lacks a permission: each service's real refusal, as the SDK parses it from
/// the wire, must become a permanent error that names the action (it then goes to the DLQ with
/// that reason, never retried).
#[cfg(test)]
mod permission_tests {
    use super::*;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use runtime::StepError;

    const WHO: &str = "User: arn:aws:sts::222222222222:assumed-role/amiflow-refresh-worker/i-0 is not authorized to perform";

    fn reply(status: u16, body: String) -> HttpResponse {
        HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body))
    }

    fn assert_refused(err: StepError, action: &str, code: &str) {
        let StepError::Permanent(reason) = &err else {
            panic!("{action}: a missing permission must be permanent, got {err:?}");
        };
        assert!(
            reason.starts_with(&format!(
                "{action}: {code}: this worker's role may not call {action};"
            )),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("{WHO}: {action}")),
            "AWS's words are kept: {reason}"
        );
        assert!(!err.is_retryable());
    }

    fn groups(ec2: aws_sdk_ec2::Client, autoscaling: aws_sdk_autoscaling::Client) -> AwsGroups {
        AwsGroups {
            autoscaling,
            ec2,
            tag_batch: None,
        }
    }

    #[tokio::test]
    async fn ec2_unauthorized_operation_names_the_action() {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation. {WHO}: ec2:CreateLaunchTemplateVersion on resource: arn:aws:ec2:us-east-1:222222222222:launch-template/lt-0abc because no identity-based policy allows the ec2:CreateLaunchTemplateVersion action. Encoded authorization failure message: {}</Message></Error></Errors><RequestID>5c0d2b1e-1</RequestID></Response>",
            "x".repeat(6000)
        );
        let rule = mock!(aws_sdk_ec2::Client::create_launch_template_version)
            .then_http_response(move || reply(403, body.clone()));
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&rule]);
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, []);
        let err = groups(ec2, autoscaling)
            .create_version(
                "lt-0abc",
                2,
                "ami-0a1b2c3d4e5f60718",
                "amiflow: ami-0a1b2c3d4e5f60718",
            )
            .await
            .unwrap_err();
        assert_refused(
            err,
            "ec2:CreateLaunchTemplateVersion",
            "UnauthorizedOperation",
        );
        assert_eq!(rule.num_calls(), 1, "not retried");
    }

    #[tokio::test]
    async fn a_new_version_carries_a_client_token_that_only_the_same_request_repeats() {
        use std::sync::{Arc, Mutex};
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&tokens);
        let rule = mock!(aws_sdk_ec2::Client::create_launch_template_version)
            .match_requests(move |req| {
                seen.lock()
                    .unwrap()
                    .push(req.client_token().unwrap_or_default().to_owned());
                true
            })
            .then_output(|| {
                aws_sdk_ec2::operation::create_launch_template_version::CreateLaunchTemplateVersionOutput::builder()
                    .launch_template_version(
                        aws_sdk_ec2::types::LaunchTemplateVersion::builder()
                            .version_number(3)
                            .build(),
                    )
                    .build()
            });
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&rule]);
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, []);
        let aws = groups(ec2, autoscaling);
        let ami = "ami-0a1b2c3d4e5f60718";
        let note = format!("amiflow: {ami}");
        for (template, source, image, description) in [
            ("lt-0abc", 2, ami, note.as_str()),
            ("lt-0abc", 2, ami, note.as_str()),
            ("lt-0abc", 1, ami, note.as_str()),
            ("lt-0def", 2, ami, note.as_str()),
            ("lt-0abc", 2, "ami-0fffffffffffffff1", note.as_str()),
            ("lt-0abc", 2, ami, "amiflow: other"),
        ] {
            assert_eq!(
                aws.create_version(template, source, image, description)
                    .await
                    .unwrap(),
                3
            );
        }
        let tokens = tokens.lock().unwrap().clone();
        assert!(
            tokens[0].starts_with("amiflow-ami-0a1b2c3d4e5f60718-"),
            "{tokens:?}"
        );
        assert!(
            tokens.iter().all(|t| t.len() <= 64 && t.is_ascii()),
            "{tokens:?}"
        );
        assert_eq!(tokens[0], tokens[1], "the same request, the same token");
        let distinct: std::collections::BTreeSet<&String> = tokens.iter().collect();
        assert_eq!(
            distinct.len(),
            5,
            "any other request, another token: {tokens:?}"
        );
    }

    #[tokio::test]
    async fn ssm_access_denied_exception_names_the_action() {
        let body = format!(
            r#"{{"__type":"AccessDeniedException","message":"{WHO}: ssm:PutParameter on resource: arn:aws:ssm:us-east-1:222222222222:parameter/golden/al2023/ami-id because no identity-based policy allows the ssm:PutParameter action"}}"#
        );
        let rule = mock!(aws_sdk_ssm::Client::put_parameter)
            .then_http_response(move || reply(400, body.clone()));
        let ssm = mock_client!(aws_sdk_ssm, RuleMode::MatchAny, [&rule]);
        let err = SsmParameters(ssm)
            .put_image("/golden/al2023/ami-id", "ami-0a1b2c3d4e5f60718")
            .await
            .unwrap_err();
        assert_refused(err, "ssm:PutParameter", "AccessDeniedException");
        assert_eq!(rule.num_calls(), 1, "not retried");
    }

    #[tokio::test]
    async fn auto_scaling_access_denied_names_the_action() {
        let body = format!(
            "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{WHO}: autoscaling:StartInstanceRefresh on resource: arn:aws:autoscaling:us-east-1:222222222222:autoScalingGroup:*:autoScalingGroupName/uat-web because no identity-based policy allows the autoscaling:StartInstanceRefresh action</Message></Error><RequestId>9f1c</RequestId></ErrorResponse>"
        );
        let rule = mock!(aws_sdk_autoscaling::Client::start_instance_refresh)
            .then_http_response(move || reply(403, body.clone()));
        let autoscaling = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, [&rule]);
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, []);
        let err = groups(ec2, autoscaling)
            .start_refresh("uat-web", &RefreshRequest::default())
            .await
            .unwrap_err();
        assert_refused(err, "autoscaling:StartInstanceRefresh", "AccessDenied");
        assert_eq!(rule.num_calls(), 1, "not retried");
    }
}
