"""boto3 checks of amiflow_shim.cloudformation: stack tags, SSM-typed parameter re-resolution on
UpdateStack with the previous template and values, dynamic references left alone."""

import pathlib
import random
import time

import pytest
from botocore.exceptions import ClientError

# Shared with the Rust SDK checks (tests/tests/emulator/cloudformation.rs).
SSM_TYPED = (pathlib.Path(__file__).parent / "templates" / "ssm-typed-stack.yaml").read_text()

DYNAMIC = """
Parameters:
  InstanceType:
    Type: String
    Default: t3.micro
Resources:
  LT:
    Type: AWS::EC2::LaunchTemplate
    Properties:
      LaunchTemplateData:
        ImageId: "{{resolve:ssm:/golden/dyn}}"
        InstanceType: !Ref InstanceType
  Group:
    Type: AWS::AutoScaling::AutoScalingGroup
    Properties:
      MinSize: "1"
      MaxSize: "1"
      AvailabilityZones: [us-east-1a]
      LaunchTemplate:
        LaunchTemplateId: !Ref LT
        Version: !GetAtt LT.LatestVersionNumber
"""

PREVIOUS = {"UsePreviousTemplate": True}


def new_account():
    return str(random.randint(10**11, 10**12 - 1))


def wait_for(predicate, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)


@pytest.fixture
def clients(session_for, endpoint):
    session = session_for(new_account())
    return {name: session.client(name, endpoint_url=endpoint) for name in ("cloudformation", "ec2", "ssm", "autoscaling")}


def stack_done(cfn, name, status):
    def check():
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        assert not stack["StackStatus"].endswith(("FAILED", "ROLLBACK_COMPLETE")), stack["StackStatus"]
        return stack if stack["StackStatus"] == status else None
    return wait_for(check)


def resources(cfn, name):
    return {r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in cfn.list_stack_resources(StackName=name)["StackResourceSummaries"]}


def group_of(asg, name):
    return asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]


def test_ssm_typed_parameter_is_re_resolved_on_update(clients):
    cfn, ec2, ssm, asg = (clients[k] for k in ("cloudformation", "ec2", "ssm", "autoscaling"))
    ami1 = ec2.register_image(Name="web-1")["ImageId"]
    ami2 = ec2.register_image(Name="web-2")["ImageId"]
    ssm.put_parameter(Name="/golden/web", Value=ami1, Type="String", DataType="aws:ec2:image")

    stack_id = cfn.create_stack(StackName="web", TemplateBody=SSM_TYPED)["StackId"]
    stack = stack_done(cfn, "web", "CREATE_COMPLETE")
    params = {p["ParameterKey"]: p for p in stack["Parameters"]}
    assert params["ImageId"]["ParameterValue"] == "/golden/web"
    assert params["ImageId"]["ResolvedValue"] == ami1

    before = resources(cfn, "web")
    lt_id, group_name = before["LT"], before["Group"]

    # Stack tags on the group and the launch template.
    group = group_of(asg, group_name)
    tags = {t["Key"]: t for t in group["Tags"]}
    assert tags["aws:cloudformation:stack-name"]["Value"] == "web"
    assert tags["aws:cloudformation:stack-id"]["Value"] == stack_id
    assert tags["aws:cloudformation:logical-id"]["Value"] == "Group"
    assert tags["aws:cloudformation:stack-name"]["PropagateAtLaunch"] is True
    filtered = asg.describe_auto_scaling_groups(
        Filters=[{"Name": "tag-key", "Values": ["aws:cloudformation:stack-name"]}])["AutoScalingGroups"]
    assert [g["AutoScalingGroupName"] for g in filtered] == [group_name]
    lt_tags = {t["Key"]: t["Value"] for t in ec2.describe_launch_templates(LaunchTemplateIds=[lt_id])["LaunchTemplates"][0]["Tags"]}
    assert (lt_tags["aws:cloudformation:stack-name"], lt_tags["aws:cloudformation:logical-id"]) == ("web", "LT")
    first_instances = [i["InstanceId"] for i in group["Instances"]]
    assert len(first_instances) == 1
    inst = ec2.describe_instances(InstanceIds=first_instances)["Reservations"][0]["Instances"][0]
    assert inst["ImageId"] == ami1
    assert {"Key": "aws:cloudformation:logical-id", "Value": "Group"} in inst["Tags"]

    keep = [{"ParameterKey": "ImageId", "UsePreviousValue": True},
            {"ParameterKey": "InstanceType", "UsePreviousValue": True}]
    # Nothing changed in Parameter Store: AWS's answer.
    with pytest.raises(ClientError) as err:
        cfn.update_stack(StackName="web", Parameters=keep, **PREVIOUS)
    assert err.value.response["Error"]["Code"] == "ValidationError"
    assert "No updates are to be performed" in err.value.response["Error"]["Message"]

    ssm.put_parameter(Name="/golden/web", Value=ami2, Type="String", DataType="aws:ec2:image", Overwrite=True)
    cfn.update_stack(StackName="web", Parameters=keep, **PREVIOUS)
    stack = stack_done(cfn, "web", "UPDATE_COMPLETE")
    params = {p["ParameterKey"]: p for p in stack["Parameters"]}
    assert (params["ImageId"]["ParameterValue"], params["ImageId"]["ResolvedValue"]) == ("/golden/web", ami2)

    # Same physical resources: the template got a new version, the group was updated in place.
    assert resources(cfn, "web") == before
    lt = ec2.describe_launch_templates(LaunchTemplateIds=[lt_id])["LaunchTemplates"][0]
    assert (lt["LatestVersionNumber"], lt["DefaultVersionNumber"]) == (2, 1)  # CFN never moves the default
    v2 = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["2"])["LaunchTemplateVersions"][0]
    assert v2["LaunchTemplateData"]["ImageId"] == ami2
    assert v2["LaunchTemplateData"]["InstanceType"] == "t3.micro"

    group = group_of(asg, group_name)
    assert group["LaunchTemplate"]["LaunchTemplateId"] == lt_id
    assert group["LaunchTemplate"]["Version"] == "2"
    assert [i["InstanceId"] for i in group["Instances"]] == first_instances  # no UpdatePolicy: not replaced
    assert "aws:cloudformation:stack-name" in {t["Key"] for t in group["Tags"]}

    # New capacity launches from the new AMI.
    asg.set_desired_capacity(AutoScalingGroupName=group_name, DesiredCapacity=2)
    group = wait_for(lambda: (g := group_of(asg, group_name)) and len(g["Instances"]) == 2 and g)
    new_ids = [i["InstanceId"] for i in group["Instances"] if i["InstanceId"] not in first_instances]
    new = ec2.describe_instances(InstanceIds=new_ids)["Reservations"][0]["Instances"][0]
    assert new["ImageId"] == ami2

    # A second update with nothing new is again refused.
    with pytest.raises(ClientError):
        cfn.update_stack(StackName="web", Parameters=keep, **PREVIOUS)

    # The next AMI: the group follows it and keeps the capacity it was scaled to (CloudFormation only
    # sends properties whose value changed; DesiredCapacity did not).
    ami3 = ec2.register_image(Name="web-3")["ImageId"]
    ssm.put_parameter(Name="/golden/web", Value=ami3, Type="String", DataType="aws:ec2:image", Overwrite=True)
    cfn.update_stack(StackName="web", Parameters=keep, **PREVIOUS)
    wait_for(lambda: group_of(asg, group_name)["LaunchTemplate"]["Version"] == "3")
    group = group_of(asg, group_name)
    assert (group["DesiredCapacity"], len(group["Instances"])) == (2, 2)
    v3 = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["$Latest"])["LaunchTemplateVersions"][0]
    assert (v3["VersionNumber"], v3["LaunchTemplateData"]["ImageId"]) == (3, ami3)


def test_dynamic_reference_not_re_resolved(clients):
    cfn, ec2, ssm, asg = (clients[k] for k in ("cloudformation", "ec2", "ssm", "autoscaling"))
    ami1 = ec2.register_image(Name="dyn-1")["ImageId"]
    ami2 = ec2.register_image(Name="dyn-2")["ImageId"]
    ssm.put_parameter(Name="/golden/dyn", Value=ami1, Type="String", DataType="aws:ec2:image")
    cfn.create_stack(StackName="dyn", TemplateBody=DYNAMIC)
    stack_done(cfn, "dyn", "CREATE_COMPLETE")
    lt_id, group_name = resources(cfn, "dyn")["LT"], resources(cfn, "dyn")["Group"]
    v1 = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id)["LaunchTemplateVersions"]
    assert [v["LaunchTemplateData"]["ImageId"] for v in v1] == [ami1]  # resolved at create

    ssm.put_parameter(Name="/golden/dyn", Value=ami2, Type="String", DataType="aws:ec2:image", Overwrite=True)
    with pytest.raises(ClientError) as err:
        cfn.update_stack(StackName="dyn", Parameters=[{"ParameterKey": "InstanceType", "UsePreviousValue": True}], **PREVIOUS)
    assert "No updates are to be performed" in err.value.response["Error"]["Message"]
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id)["LaunchTemplateVersions"]
    assert [v["LaunchTemplateData"]["ImageId"] for v in versions] == [ami1]
    group = group_of(asg, group_name)
    assert group["LaunchTemplate"]["Version"] == "1"
    assert group["Instances"] and {i["LaunchTemplate"]["Version"] for i in group["Instances"]} == {"1"}
    running = ec2.describe_instances(InstanceIds=[i["InstanceId"] for i in group["Instances"]])["Reservations"]
    assert {i["ImageId"] for r in running for i in r["Instances"]} == {ami1}

    # Changing something else in the resource re-resolves it (AWS resolves on every resource update).
    cfn.update_stack(StackName="dyn", Parameters=[{"ParameterKey": "InstanceType", "ParameterValue": "t3.small"}], **PREVIOUS)
    stack_done(cfn, "dyn", "UPDATE_COMPLETE")
    latest = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["$Latest"])["LaunchTemplateVersions"][0]
    assert (latest["VersionNumber"], latest["LaunchTemplateData"]["ImageId"], latest["LaunchTemplateData"]["InstanceType"]) == (2, ami2, "t3.small")
    # ...and the group follows the template's new LatestVersionNumber.
    assert group_of(asg, group_name)["LaunchTemplate"]["Version"] == "2"
