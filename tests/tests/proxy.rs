//! The fault proxy against the emulator with the real SDK: each fault comes back in the
//! shape the service's SDK recognises (so the SDK's retry treats throttling as throttling), refused
//! calls never reach the emulator, every call is counted by service and action, and in AWS-rate
//! mode the runtime's own rate limits keep a worker under AWS's buckets.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use e2e::Local;
use e2e::proxy::{FaultPlan, FaultProxy};

/// Every call fails with `fault`.
fn always(fault: &str) -> FaultPlan {
    let mut plan = FaultPlan::default();
    match fault {
        "throttle" => plan.throttle = 1.0,
        "5xx" => plan.server_error = 1.0,
        "reset" => plan.reset = 1.0,
        other => panic!("no fault {other}"),
    }
    plan
}

async fn sdk_with(endpoint: &str, retry: RetryConfig) -> aws_config::SdkConfig {
    e2e::sdk_config(endpoint)
        .await
        .into_builder()
        .retry_config(retry)
        .build()
}

/// (error code, calls the proxy saw) of one call per service, with the SDK's retry as given.
async fn codes(proxy: &FaultProxy, retry: RetryConfig) -> Vec<(String, Option<String>, u64)> {
    let config = sdk_with(&proxy.endpoint(), retry).await;
    let before = proxy.stats();
    let mut out = Vec::new();
    let ec2 = aws_sdk_ec2::Client::new(&config)
        .describe_images()
        .send()
        .await
        .err()
        .map(|e| e.into_service_error().code().map(str::to_owned));
    out.push(("ec2:DescribeImages", ec2));
    let asg = aws_sdk_autoscaling::Client::new(&config)
        .describe_auto_scaling_groups()
        .send()
        .await
        .err()
        .map(|e| e.into_service_error().code().map(str::to_owned));
    out.push(("autoscaling:DescribeAutoScalingGroups", asg));
    let ssm = aws_sdk_ssm::Client::new(&config)
        .get_parameter()
        .name("/golden/x")
        .send()
        .await
        .err()
        .map(|e| e.into_service_error().code().map(str::to_owned));
    out.push(("ssm:GetParameter", ssm));
    let sqs = aws_sdk_sqs::Client::new(&config)
        .list_queues()
        .send()
        .await
        .err()
        .map(|e| e.into_service_error().code().map(str::to_owned));
    out.push(("sqs:ListQueues", sqs));
    let events = aws_sdk_eventbridge::Client::new(&config)
        .list_rules()
        .send()
        .await
        .err()
        .map(|e| e.into_service_error().code().map(str::to_owned));
    out.push(("events:ListRules", events));
    let after = proxy.stats();
    out.into_iter()
        .map(|(name, code)| {
            let (service, action) = name.split_once(':').unwrap();
            let key = (service.to_owned(), action.to_owned());
            let seen =
                after.get(&key).map_or(0, |s| s.calls) - before.get(&key).map_or(0, |s| s.calls);
            (
                name.to_owned(),
                code.expect("every call fails through the proxy"),
                seen,
            )
        })
        .collect()
}

#[tokio::test]
async fn throttling_comes_back_in_each_services_own_shape_and_the_sdk_retries_it() {
    let local = Local::start().await;
    let proxy = FaultProxy::start(&local.endpoint(), always("throttle")).await;
    let once = codes(&proxy, RetryConfig::disabled()).await;
    let expected = [
        ("ec2:DescribeImages", "RequestLimitExceeded"),
        ("autoscaling:DescribeAutoScalingGroups", "Throttling"),
        ("ssm:GetParameter", "ThrottlingException"),
        ("sqs:ListQueues", "RequestThrottled"),
        ("events:ListRules", "ThrottlingException"),
    ];
    for ((name, code, seen), (want_name, want_code)) in once.iter().zip(expected) {
        assert_eq!(name, want_name);
        assert_eq!(code.as_deref(), Some(want_code), "{name}");
        assert_eq!(*seen, 1, "{name}: one attempt without retry");
    }
    // With the SDK's standard retry (3 attempts) each is retried as a throttling error.
    let retried = codes(&proxy, RetryConfig::standard().with_max_attempts(3)).await;
    for (name, _, seen) in &retried {
        assert_eq!(*seen, 3, "{name}: the SDK retried the throttling reply");
    }
    let total = proxy.total();
    assert_eq!(total.forwarded, 0, "no throttled call reached the emulator");
    assert_eq!(total.throttled, total.calls);
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried_and_never_reach_the_emulator() {
    let local = Local::start().await;
    let proxy = FaultProxy::start(&local.endpoint(), always("5xx")).await;
    for (name, code, seen) in codes(&proxy, RetryConfig::disabled()).await {
        let code = code.unwrap_or_default();
        assert!(
            [
                "InternalError",
                "Unavailable",
                "InternalFailure",
                "ServiceUnavailable",
                "ServiceUnavailableException"
            ]
            .contains(&code.as_str()),
            "{name}: {code}"
        );
        assert_eq!(seen, 1);
    }
    for (name, _, seen) in codes(&proxy, RetryConfig::standard().with_max_attempts(3)).await {
        assert_eq!(seen, 3, "{name}: a 5xx is transient for the SDK");
    }

    proxy.set_plan(always("reset"));
    let config = sdk_with(
        &proxy.endpoint(),
        RetryConfig::standard().with_max_attempts(3),
    )
    .await;
    let err = aws_sdk_ssm::Client::new(&config)
        .put_parameter()
        .name("/never")
        .value("x")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, aws_sdk_ssm::error::SdkError::DispatchFailure(_)),
        "a dropped connection is a dispatch failure: {err:?}"
    );
    let stats = proxy.stats();
    let put = &stats[&("ssm".to_owned(), "PutParameter".to_owned())];
    assert_eq!((put.calls, put.resets, put.forwarded), (3, 3, 0), "{put:?}");
    // Nothing was written: the emulator never saw the call.
    let direct = aws_sdk_ssm::Client::new(&local.config);
    assert!(direct.get_parameter().name("/never").send().await.is_err());
    let total = proxy.total();
    assert_eq!(total.forwarded, 0);
    assert_eq!(total.failed(), total.calls);
}

#[tokio::test]
async fn random_faults_follow_the_seed_and_clean_calls_pass_through_unchanged() {
    let local = Local::start().await;
    // No faults: the proxy is transparent.
    let proxy = FaultProxy::start(&local.endpoint(), FaultPlan::default()).await;
    let config = sdk_with(&proxy.endpoint(), RetryConfig::disabled()).await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let url = sqs
        .create_queue()
        .queue_name("through-proxy")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    sqs.send_message()
        .queue_url(&url)
        .message_body("hello")
        .send()
        .await
        .unwrap();
    let got = local
        .collect(&url, 1, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|m| m.body().unwrap_or_default().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(got, ["hello"]);
    let stats = proxy.stats();
    for action in ["CreateQueue", "SendMessage"] {
        assert_eq!(
            stats[&("sqs".to_owned(), action.to_owned())].forwarded,
            1,
            "{action} counted"
        );
    }

    // Faults at 20%: the same seed draws the same faults.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let proxy = FaultProxy::start(&local.endpoint(), FaultPlan::chaos(42, 0.2)).await;
        let config = sdk_with(&proxy.endpoint(), RetryConfig::disabled()).await;
        let ssm = aws_sdk_ssm::Client::new(&config);
        let mut outcomes = Vec::new();
        for _ in 0..200 {
            outcomes.push(ssm.describe_parameters().send().await.is_ok());
        }
        let total = proxy.total();
        assert_eq!(total.calls, 200);
        let share = total.failed() as f64 / total.calls as f64;
        assert!((0.12..=0.28).contains(&share), "about 20% fail: {total:?}");
        assert!(total.throttled > 0 && total.server_errors > 0 && total.resets > 0);
        assert_eq!(
            outcomes.iter().filter(|ok| !**ok).count() as u64,
            total.failed()
        );
        runs.push(outcomes);
    }
    assert_eq!(runs[0], runs[1], "seed 42 draws the same faults twice");
}

#[tokio::test]
async fn at_aws_rates_the_proxy_throttles_bursts_and_the_runtime_limits_stay_under_them() {
    let local = Local::start().await;
    let proxy = FaultProxy::start(&local.endpoint(), FaultPlan::aws_limits()).await;
    let config = sdk_with(&proxy.endpoint(), RetryConfig::disabled()).await;
    let asg = aws_sdk_autoscaling::Client::new(&config);
    // A burst of 40 Auto Scaling calls at once without any limit: AWS's bucket of 20 runs dry.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let asg = asg.clone();
        burst.spawn(async move { asg.describe_auto_scaling_groups().send().await });
    }
    let mut refused = 0;
    while let Some(done) = burst.join_next().await {
        if let Err(e) = done.unwrap() {
            assert_eq!(e.into_service_error().code(), Some("Throttling"));
            refused += 1;
        }
    }
    // 20 in the bucket, plus one per 100 ms the burst took to arrive.
    assert!(
        (5..=20).contains(&refused),
        "about half the burst is throttled: {refused}"
    );
    // The same with the runtime's token bucket in front, as another caller (AWS's buckets are
    // per caller and start full, like the runtime's): nothing is throttled.
    let limited = sdk_with(&proxy.endpoint(), RetryConfig::disabled())
        .await
        .into_builder()
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_sdk_sqs::config::Credentials::new("limited", "limited", None, None, "e2e"),
            ),
        )
        .build();
    let asg = aws_sdk_autoscaling::Client::new(&limited);
    let before = proxy.total();
    for _ in 0..30 {
        runtime::limits::acquire(runtime::limits::Api::AutoScaling).await;
        asg.describe_auto_scaling_groups()
            .send()
            .await
            .expect("the runtime's limit keeps the call under AWS's bucket");
    }
    let after = proxy.total();
    assert_eq!(after.throttled - before.throttled, 0);
    assert_eq!(after.calls - before.calls, 30);
}

/// A reply lost after the change: the version is made, the caller hears nothing; its retry of the
/// same request (the same `ClientToken`, as `rollout::aws::Templates::create_version` sends)
/// gets that version back instead of making a second one.
#[tokio::test]
async fn a_lost_reply_of_a_new_template_version_is_made_good_by_its_client_token() {
    use rollout::aws::{AwsGroups, Templates};
    use runtime::StepError;
    let local = Local::start().await;
    let proxy = FaultProxy::start(
        &local.endpoint(),
        FaultPlan::losing_replies_of(7, "CreateLaunchTemplateVersion", 1.0),
    )
    .await;
    let direct = aws_sdk_ec2::Client::new(&local.config);
    let template = direct
        .create_launch_template()
        .launch_template_name("lost-reply")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id("ami-0000000000000000a")
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_owned();
    let groups = AwsGroups::new(&sdk_with(&proxy.endpoint(), RetryConfig::disabled()).await);
    let lost = groups
        .create_version(&template, 1, "ami-0000000000000000b", "golden")
        .await
        .unwrap_err();
    assert!(
        matches!(&lost, StepError::Transient(why) if why.contains("ec2:CreateLaunchTemplateVersion")),
        "a lost reply is a transient failure to retry: {lost:?}"
    );
    let versions = |direct: aws_sdk_ec2::Client, template: String| async move {
        direct
            .describe_launch_template_versions()
            .launch_template_id(template)
            .send()
            .await
            .unwrap()
            .launch_template_versions()
            .iter()
            .filter_map(|v| v.version_number())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        versions(direct.clone(), template.clone()).await,
        [2, 1],
        "the lost call made version 2"
    );
    proxy.set_plan(FaultPlan::default());
    assert_eq!(
        groups
            .create_version(&template, 1, "ami-0000000000000000b", "golden")
            .await
            .unwrap(),
        2,
        "the retry gets the version the lost call made"
    );
    assert_eq!(
        versions(direct, template).await,
        [2, 1],
        "and makes no second one"
    );
    let stats = proxy.stats();
    let made = &stats[&("ec2".to_owned(), "CreateLaunchTemplateVersion".to_owned())];
    assert_eq!((made.forwarded, made.lost_replies), (2, 1), "{made:?}");
}
