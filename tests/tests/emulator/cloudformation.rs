//! CloudFormation's re-resolution of an SSM-typed parameter on an update with previous values, read
//! back through the Rust SDK (`ResolvedValue`, the new launch template version, the group's
//! instances). The dynamic-reference case and the rest are in local/tests/test_cloudformation.py.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_cloudformation::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::InstanceType;
use e2e::eventually;

use crate::fixture::{WAIT, emulator, facts, group_lt_version, launch_facts, put_image_param};

/// The stack both this file and local/tests/test_cloudformation.py make.
const SSM_TYPED: &str = include_str!("../../../local/tests/templates/ssm-typed-stack.yaml");

async fn stack_status(cfn: &aws_sdk_cloudformation::Client, stack: &str, want: &str) {
    eventually(&format!("stack {stack} {want}"), WAIT, || async {
        let out = cfn
            .describe_stacks()
            .stack_name(stack)
            .send()
            .await
            .unwrap();
        let status = out.stacks()[0]
            .stack_status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        assert!(
            !status.ends_with("FAILED") && !status.ends_with("ROLLBACK_COMPLETE"),
            "stack {stack}: {status}"
        );
        (status == want).then_some(())
    })
    .await;
}

async fn stack_resources(
    cfn: &aws_sdk_cloudformation::Client,
    stack: &str,
) -> BTreeMap<String, String> {
    cfn.list_stack_resources()
        .stack_name(stack)
        .send()
        .await
        .unwrap()
        .stack_resource_summaries()
        .iter()
        .map(|r| {
            (
                r.logical_resource_id().unwrap().to_owned(),
                r.physical_resource_id().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn keep(key: &str) -> aws_sdk_cloudformation::types::Parameter {
    aws_sdk_cloudformation::types::Parameter::builder()
        .parameter_key(key)
        .use_previous_value(true)
        .build()
}

async fn lt_images(ec2: &aws_sdk_ec2::Client, lt: &str) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = ec2
        .describe_launch_template_versions()
        .launch_template_id(lt)
        .send()
        .await
        .unwrap()
        .launch_template_versions()
        .iter()
        .map(|v| {
            (
                v.version_number().unwrap(),
                v.launch_template_data()
                    .and_then(|d| d.image_id())
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn stack_update_with_previous_values_re_resolves_the_ssm_typed_parameter() {
    let (_local, c) = emulator().await;
    let (a, b) = (c.register("web-1").await, c.register("web-2").await);
    put_image_param(&c.ssm, "/golden/web", &a, false)
        .await
        .unwrap();

    c.cfn
        .create_stack()
        .stack_name("web")
        .template_body(SSM_TYPED)
        .send()
        .await
        .unwrap();
    stack_status(&c.cfn, "web", "CREATE_COMPLETE").await;
    let res = stack_resources(&c.cfn, "web").await;
    let (lt, group) = (res["LT"].clone(), res["Group"].clone());
    let g = c.group(&group).await;
    let tags: BTreeMap<&str, &str> = g
        .tags()
        .iter()
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    assert_eq!(tags.get("aws:cloudformation:stack-name"), Some(&"web"));
    assert_eq!(tags.get("aws:cloudformation:logical-id"), Some(&"Group"));
    assert_eq!(lt_images(&c.ec2, &lt).await, [(1, a.clone())]);
    assert_eq!(launch_facts(&c.members(&group).await), facts(&a, "1", "1"));

    let update = || {
        c.cfn
            .update_stack()
            .stack_name("web")
            .use_previous_template(true)
            .parameters(keep("ImageId"))
            .parameters(keep("InstanceType"))
    };
    // Nothing changed in Parameter Store: nothing to do.
    let nothing = update().send().await;
    let err = nothing.expect_err("no updates");
    assert_eq!(err.code(), Some("ValidationError"));
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("No updates are to be performed"),
        "{err:?}"
    );

    put_image_param(&c.ssm, "/golden/web", &b, true)
        .await
        .unwrap();
    update().send().await.unwrap();
    stack_status(&c.cfn, "web", "UPDATE_COMPLETE").await;

    assert_eq!(
        stack_resources(&c.cfn, "web").await,
        res,
        "updated in place"
    );
    assert_eq!(
        lt_images(&c.ec2, &lt).await,
        [(1, a.clone()), (2, b.clone())]
    );
    let v2 = c
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(&lt)
        .versions("$Latest")
        .send()
        .await
        .unwrap();
    let data = v2.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(data.image_id(), Some(b.as_str()));
    assert_eq!(
        data.instance_type().map(InstanceType::as_str),
        Some("t3.micro")
    );
    let g = c.group(&group).await;
    assert_eq!(group_lt_version(&g).as_deref(), Some("2"));
    let stack = c
        .cfn
        .describe_stacks()
        .stack_name("web")
        .send()
        .await
        .unwrap();
    let image_param = stack.stacks()[0]
        .parameters()
        .iter()
        .find(|p| p.parameter_key() == Some("ImageId"))
        .unwrap()
        .clone();
    assert_eq!(image_param.parameter_value(), Some("/golden/web"));
    assert_eq!(image_param.resolved_value(), Some(b.as_str()));

    // New capacity comes from the new AMI.
    c.asg
        .set_desired_capacity()
        .auto_scaling_group_name(&group)
        .desired_capacity(2)
        .send()
        .await
        .unwrap();
    let members = c.members(&group).await;
    let images: BTreeSet<&str> = members.values().map(|m| m.image.as_str()).collect();
    assert_eq!(images, BTreeSet::from([a.as_str(), b.as_str()]));
}
