//! Benchmark: how close a worker gets to AWS's request rates, and how often AWS throttles it.
//!
//! The fault proxy (tests/src/proxy.rs) stands in for AWS's request-token buckets
//! ([`e2e::proxy::aws_bucket`]: EC2 mutating 100 + 5/s, SSM `PutParameter` 3/s, Auto Scaling
//! 20 + 10/s) in front of the emulator. For each bucket, one caller makes calls as fast as it can
//! for a fixed time, twice:
//! - through the runtime's limits (`runtime::limits::acquire`, as every worker does), and
//! - as a raw SDK loop with the SDK's standard retry and no limit (the baseline).
//!
//! Reported per bucket: the calls AWS accepted as a share of what its bucket allows in that time
//! (size + refill x time; target at least 90%) and the share of calls throttled (target at most
//! 2%). Writes its section of BENCHMARKS.md. `just bench-throttle`.

use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_config::retry::RetryConfig;
use chrono::Utc;
use e2e::proxy::{FaultPlan, FaultProxy, aws_bucket};
use runtime::limits::{Api, acquire};

/// One caller of its own (AWS's buckets are per caller, and start full).
async fn caller(endpoint: &str, name: &str) -> SdkConfig {
    e2e::sdk_config(endpoint)
        .await
        .into_builder()
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_sdk_sqs::config::Credentials::new(name, "bench", None, None, "bench"),
            ),
        )
        .build()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Ec2Mutating,
    SsmPutParameter,
    AutoScaling,
}

impl Target {
    fn api(self) -> Api {
        match self {
            Target::Ec2Mutating => Api::Ec2Mutating,
            Target::SsmPutParameter => Api::SsmPutParameter,
            Target::AutoScaling => Api::AutoScaling,
        }
    }

    fn call(self) -> (&'static str, &'static str) {
        match self {
            Target::Ec2Mutating => ("ec2", "CreateLaunchTemplateVersion"),
            Target::SsmPutParameter => ("ssm", "PutParameter"),
            Target::AutoScaling => ("autoscaling", "DescribeAutoScalingGroups"),
        }
    }
}

/// What one run did: (calls the caller made, calls AWS accepted, calls throttled).
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    calls: u64,
    accepted: u64,
    throttled: u64,
}

async fn run(
    proxy: &FaultProxy,
    target: Target,
    limited: bool,
    seconds: u64,
    template: &str,
) -> Run {
    let name = format!(
        "bench-{:?}-{}",
        target,
        if limited { "limited" } else { "raw" }
    );
    let config = caller(&proxy.endpoint(), &name).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let asg = aws_sdk_autoscaling::Client::new(&config);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < until {
        if limited {
            acquire(target.api()).await;
            if Instant::now() >= until {
                break;
            }
        }
        n += 1;
        // Errors are counted by the proxy; what a worker would do with them is not measured here.
        let _accepted: bool = match target {
            Target::Ec2Mutating => ec2
                .create_launch_template_version()
                .launch_template_id(template)
                .source_version("1")
                .launch_template_data(template_data())
                .send()
                .await
                .is_ok(),
            Target::SsmPutParameter => ssm
                .put_parameter()
                .name(format!("/bench/{name}/{n}"))
                .value("x")
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .send()
                .await
                .is_ok(),
            Target::AutoScaling => asg.describe_auto_scaling_groups().send().await.is_ok(),
        };
    }
    let (service, action) = target.call();
    let mut out = Run::default();
    for (_, s, a, who, throttled) in proxy.records() {
        if who == name && s == service && a == action {
            out.calls += 1;
            if throttled {
                out.throttled += 1;
            } else {
                out.accepted += 1;
            }
        }
    }
    out
}

/// What the benchmark's launch template and its new versions hold.
fn template_data() -> aws_sdk_ec2::types::RequestLaunchTemplateData {
    aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
        .image_id("ami-0123456789abcdef0")
        .build()
}

#[tokio::main]
async fn main() {
    let local = e2e::Local::start().await;
    let ec2 = aws_sdk_ec2::Client::new(&local.config);
    let template = ec2
        .create_launch_template()
        .launch_template_name("bench")
        .launch_template_data(template_data())
        .send()
        .await
        .expect("a launch template")
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_owned();
    let proxy = FaultProxy::start(&local.endpoint(), FaultPlan::aws_limits()).await;
    let plan = [
        (Target::Ec2Mutating, 30u64),
        (Target::AutoScaling, 15),
        (Target::SsmPutParameter, 15),
    ];
    let mut body = format!(
        "## Throttling at AWS's rates (`just bench-throttle`)\n\n\
         One caller per run calls as fast as it can for the time given, through the fault proxy\n\
         enforcing AWS's request-token buckets in front of the emulator; measured {date}. \"Of AWS's\n\
         allowance\" is the calls AWS accepted over what its bucket allows in that time (size +\n\
         refill x time): how close the caller ran to the allowed rate.\n\n\
         | bucket (AWS size + refill) | call | seconds | loop | calls | accepted | of AWS's allowance | throttled |\n\
         |---|---|---|---|---|---|---|---|\n",
        date = Utc::now().format("%Y-%m-%d"),
    );
    let mut verdicts = Vec::new();
    for (target, seconds) in plan {
        let (service, action) = target.call();
        let (bucket, size, refill) = aws_bucket(service, action).unwrap();
        let allowance = f64::from(size) + f64::from(refill) * seconds as f64;
        for limited in [true, false] {
            let r = run(&proxy, target, limited, seconds, &template).await;
            let share = r.throttled as f64 / r.calls.max(1) as f64;
            let used = r.accepted as f64 / allowance;
            let label = if limited {
                "runtime limits"
            } else {
                "raw SDK loop (baseline)"
            };
            println!(
                "{bucket} {label}: {} calls, {} accepted ({:.0}% of allowance), {} throttled ({:.1}%)",
                r.calls,
                r.accepted,
                used * 100.0,
                r.throttled,
                share * 100.0
            );
            body.push_str(&format!(
                "| {bucket} ({size} + {refill}/s) | {service}:{action} | {seconds} | {label} | {} | {} | {:.0}% | {} ({:.1}%) |\n",
                r.calls,
                r.accepted,
                used * 100.0,
                r.throttled,
                share * 100.0
            ));
            if limited {
                verdicts.push(format!(
                    "{bucket}: {:.0}% of the allowance, {:.1}% throttled",
                    used * 100.0,
                    share * 100.0
                ));
            }
        }
    }
    body.push_str(&format!(
        "\nTargets: at least 90% of AWS's allowance with at most 2% of calls throttled. Through the\n\
         runtime's limits: {}. The worker's buckets are 90% of AWS's size refilled at 95% of its rate\n\
         (`runtime::limits`), so the margin absorbs the clocks of the two buckets not starting\n\
         together. The baseline shows what the limits save: the SDK's retry alone keeps re-sending\n\
         into an empty bucket.\n",
        verdicts.join("; ")
    ));
    println!("{body}");
    e2e::write_benchmark_section("bench-throttle", &body);
}
