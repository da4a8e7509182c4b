"""boto3 checks of amiflow_shim.faults' `deny`: AWS's refusals of a missing permission, per
service protocol, for one account and a number of calls."""

import json
import random
import urllib.request

import pytest
from botocore.exceptions import ClientError


def post(endpoint, body):
    req = urllib.request.Request(f"{endpoint}/amiflow-emulator/faults", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req) as reply:
        return json.loads(reply.read())


def new_account():
    return str(random.randint(10**11, 10**12 - 1))


@pytest.fixture
def accounts(session_for, endpoint):
    yield [session_for(new_account()) for _ in range(2)]
    post(endpoint, {"deny": []})


def template_of(ec2):
    return ec2.create_launch_template(
        LaunchTemplateName=f"lt-{random.randint(0, 10**9)}", LaunchTemplateData={"InstanceType": "t3.micro"},
    )["LaunchTemplate"]["LaunchTemplateId"]


def test_a_denied_action_fails_like_aws_for_that_account_and_count_only(accounts, endpoint):
    mine, other = (s.client("ec2", endpoint_url=endpoint) for s in accounts)
    account = accounts[0].client("sts", endpoint_url=endpoint).get_caller_identity()["Account"]
    lt_mine, lt_other = template_of(mine), template_of(other)
    before = post(endpoint, {"deny": [{"account": account, "action": "ec2:CreateLaunchTemplateVersion", "times": 1}]})
    with pytest.raises(ClientError) as err:
        mine.create_launch_template_version(LaunchTemplateId=lt_mine, LaunchTemplateData={"InstanceType": "t3.small"})
    assert err.value.response["Error"]["Code"] == "UnauthorizedOperation"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "ec2:CreateLaunchTemplateVersion" in err.value.response["Error"]["Message"]
    # Another account, another action, and the next call are not refused.
    other.create_launch_template_version(LaunchTemplateId=lt_other, LaunchTemplateData={"InstanceType": "t3.small"})
    mine.describe_launch_templates(LaunchTemplateIds=[lt_mine])
    mine.create_launch_template_version(LaunchTemplateId=lt_mine, LaunchTemplateData={"InstanceType": "t3.small"})
    assert post(endpoint, {})["denied"] == before["denied"] + 1


def test_json_and_query_services_refuse_in_their_own_shapes(accounts, endpoint):
    session = accounts[0]
    account = session.client("sts", endpoint_url=endpoint).get_caller_identity()["Account"]
    post(endpoint, {"deny": [
        {"account": account, "action": "ssm:PutParameter", "times": 1},
        {"account": account, "action": "autoscaling:StartInstanceRefresh", "times": 1},
    ]})
    with pytest.raises(ClientError) as err:
        session.client("ssm", endpoint_url=endpoint).put_parameter(Name="/golden/x", Value="v", Type="String")
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(ClientError) as err:
        session.client("autoscaling", endpoint_url=endpoint).start_instance_refresh(AutoScalingGroupName="none")
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    assert "autoscaling:StartInstanceRefresh" in err.value.response["Error"]["Message"]
