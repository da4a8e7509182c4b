"""boto3 checks of amiflow_shim.cloudformation_deploy: deploy/hub.yaml and deploy/spoke.yaml create
in the emulator (Fn::ForEach, !Condition, bus and queue policies, inline role policies, the
Scheduler schedule), and a fired schedule puts its rendered input on the bus."""

import json
import os
import random
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deploy")
CAPABILITIES = ["CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"]


def new_account():
    return str(random.randint(10**11, 10**12 - 1))


def template(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return f.read()


def create(cfn, name, body, **parameters):
    cfn.create_stack(
        StackName=name, TemplateBody=body, Capabilities=CAPABILITIES,
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def resources(cfn, name):
    return {r["LogicalResourceId"]: r for r in cfn.list_stack_resources(StackName=name)["StackResourceSummaries"]}


def fire(endpoint, **request):
    req = urllib.request.Request(f"{endpoint}/amiflow-emulator/scheduler/fire", data=json.dumps(request).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def spoke_parameters(hub, stage="uat"):
    # The stage accounts whose workers may assume this spoke's role: here the hub (a stage too).
    return dict(HubAccountId=hub, Stage=stage, WindowCron="cron(0 2 ? * SAT#2 *)", WindowDurationHours="4",
                WorkerRuntime="service", StageAccountIds=hub)


@pytest.fixture
def world(session_for, endpoint):
    hub, spoke = new_account(), new_account()
    sessions = {a: session_for(a) for a in (hub, spoke)}
    client = lambda account, service: sessions[account].client(service, endpoint_url=endpoint)  # noqa: E731
    hub_out = create(client(hub, "cloudformation"), "amiflow-hub", template("hub.yaml"),
                     SpokeAccountIds=spoke, WorkerRuntime="service")
    return {"hub": hub, "spoke": spoke, "client": client, "hub_out": hub_out}


def test_the_hub_template_expands_its_loop_and_keeps_its_policies(world):
    hub, spoke, client = world["hub"], world["spoke"], world["client"]
    cfn = client(hub, "cloudformation")
    found = resources(cfn, "amiflow-hub")
    # Fn::ForEach::Spokes: one forwarding rule, forwarding policy and grant policy per spoke.
    for logical in (f"ForwardRule{spoke}", f"ForwardPolicy{spoke}", f"ShareGrantPolicy{spoke}"):
        assert found[logical]["ResourceStatus"] == "CREATE_COMPLETE", logical
    # WorkerRuntime=service: no functions, no event source mappings, no function log groups; the
    # one log group is the audit trail amictl trace reads.
    types = {r["ResourceType"] for r in found.values()}
    assert not types & {"AWS::Lambda::Function", "AWS::Lambda::EventSourceMapping"}
    log_groups = {k for k, r in found.items() if r["ResourceType"] == "AWS::Logs::LogGroup"}
    assert log_groups == {"AuditTrailLogGroup"}, log_groups
    events = client(hub, "events")
    policy = json.loads(events.describe_event_bus(Name="amiflow")["Policy"])
    assert [s["Sid"] for s in policy["Statement"]] == ["AcceptFromSpokes"]
    assert policy["Statement"][0]["Principal"]["AWS"] == [spoke]
    rule = events.describe_rule(Name=found[f"ForwardRule{spoke}"]["PhysicalResourceId"], EventBusName="amiflow")
    assert json.loads(rule["EventPattern"])["detail"] == {"target_account": [spoke]}
    iam = client(hub, "iam")
    grant = iam.get_role_policy(RoleName="amiflow-share-worker", PolicyName=f"kms-grant-{spoke}")["PolicyDocument"]
    assert grant["Statement"][0]["Condition"]["StringEquals"]["kms:GranteePrincipal"].endswith(f"::{spoke}:root")
    sqs = client(hub, "sqs")
    url = sqs.get_queue_url(QueueName="amiflow-share")["QueueUrl"]
    queue_policy = json.loads(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])
    share_rule_arn = events.describe_rule(Name=found["ShareRule"]["PhysicalResourceId"], EventBusName="amiflow")["Arn"]
    assert queue_policy["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"] == share_rule_arn


def test_a_spoke_in_the_hub_account_reuses_the_hub_bus(world):
    hub, client = world["hub"], world["client"]
    cfn = client(hub, "cloudformation")
    # !Not [!Condition IsHubAccount] must be false here: no second amiflow bus.
    out = create(cfn, "amiflow-spoke", template("spoke.yaml"), **spoke_parameters(hub, "qa"))
    found = resources(cfn, "amiflow-spoke")
    assert "Bus" not in found and "ForwardToHubRule" not in found
    assert out["BusArn"] == world["hub_out"]["BusArn"]


def test_a_fired_window_puts_the_scheduler_input_on_the_spoke_bus(world, endpoint):
    hub, spoke, client = world["hub"], world["spoke"], world["client"]
    out = create(client(spoke, "cloudformation"), "amiflow-spoke", template("spoke.yaml"), **spoke_parameters(hub))
    scheduler = client(spoke, "scheduler")
    schedule = scheduler.get_schedule(Name=out["WindowScheduleName"])
    assert schedule["ScheduleExpression"] == "cron(0 2 ? * SAT#2 *)"
    assert schedule["Target"]["Arn"] == out["BusArn"]

    status, reply = fire(endpoint, account=spoke, name=out["WindowScheduleName"],
                         scheduled_time="2026-11-14T02:00:00Z")
    assert status == 200, reply
    sqs = client(spoke, "sqs")
    got = sqs.receive_message(QueueUrl=out["PlanQueueUrl"], MaxNumberOfMessages=10, WaitTimeSeconds=2)["Messages"]
    assert len(got) == 1
    event = json.loads(got[0]["Body"])
    assert (event["source"], event["detail-type"]) == ("amiflow", "RolloutWindowOpened")
    assert event["resources"] == [schedule["Arn"]]
    assert event["detail"] == {
        "schema_version": 1, "rollout_id": "", "caused_by": "",
        "key": f"window:{spoke}:uat:2026-11-14T02:00:00Z", "emitted_at": "2026-11-14T02:00:00Z",
        "account": spoke, "stage": "uat", "opens_at": "2026-11-14T02:00:00Z", "window_hours": 4,
    }

    # A disabled window does not open.
    target = schedule["Target"]
    scheduler.update_schedule(Name=schedule["Name"], ScheduleExpression=schedule["ScheduleExpression"],
                              FlexibleTimeWindow={"Mode": "OFF"}, Target=target, State="DISABLED")
    status, reply = fire(endpoint, account=spoke, name=schedule["Name"], scheduled_time="2026-12-12T02:00:00Z")
    assert status == 409 and "DISABLED" in reply["error"]
    status, reply = fire(endpoint, account=spoke, name="no-such-window", scheduled_time="2026-12-12T02:00:00Z")
    assert status == 404, reply


@pytest.mark.parametrize("template_name,parameters,says", [
    ("spoke.yaml", {"HubAccountId": "12345"}, "12-digit AWS account id"),
    ("spoke.yaml", {"HubAccountId": "11111111111a"}, "12-digit AWS account id"),
    ("spoke.yaml", {"StageAccountIds": "222222222222,12345"}, "12-digit AWS account id"),
    ("spoke.yaml", {"WindowCron": "cron(0 2 * * *)"}, "six fields"),
    ("spoke.yaml", {"WindowCron": "rate(7 days)"}, "six fields"),
    ("spoke.yaml", {"WindowCron": "cron(0 2 ? * SAT#1 *); rm"}, "six fields"),
    ("spoke.yaml", {"WindowDurationHours": "0"}, "not less than 1"),
    ("spoke.yaml", {"WindowDurationHours": "25"}, "not greater than 24"),
    ("spoke.yaml", {"Stage": "staging"}, "must be one of qa, uat, prod"),
    ("spoke.yaml", {"WorkerRuntime": "lambda"}, "needs ArtifactBucket"),
    ("spoke.yaml", {"ArtifactBucket": "Not_A_Bucket"}, "S3 bucket name"),
    ("hub.yaml", {"SpokeAccountIds": "222222222222,33333333333"}, "12-digit AWS account id"),
    ("hub.yaml", {"OrganizationId": "org-1"}, "must match pattern"),
    ("hub.yaml", {"WorkerRuntime": "lambda"}, "needs ArtifactBucket"),
])
def test_bad_parameters_are_refused_at_create(session_for, endpoint, template_name, parameters, says):
    account = new_account()
    cfn = session_for(account).client("cloudformation", endpoint_url=endpoint)
    good = (spoke_parameters(account) if template_name == "spoke.yaml"
            else {"SpokeAccountIds": new_account(), "WorkerRuntime": "service"})
    good.update(parameters)
    with pytest.raises(ClientError) as err:
        cfn.create_stack(StackName="bad", TemplateBody=template(template_name), Capabilities=CAPABILITIES,
                         Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in good.items()])
    assert err.value.response["Error"]["Code"] == "ValidationError"
    assert says in err.value.response["Error"]["Message"], err.value.response["Error"]["Message"]
    # Nothing was created.
    assert cfn.list_stacks()["StackSummaries"] == []
