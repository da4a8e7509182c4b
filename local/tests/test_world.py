"""The local world (local/world.py): its state file matches AWS as read back, and events route as
DESIGN.md section 2 draws them. Everything goes through boto3 against the emulator."""

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from botocore.exceptions import ClientError

LOCAL = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, LOCAL)
import world  # noqa: E402

QA, UAT, PROD = "111111111111", "222222222222", "333333333333"
HUB = QA
REGION = "us-east-1"
AL2023 = "/golden/al2023/ami-id"
WIN2022 = "/golden/win2022/ami-id"
SMALL_KINDS = {"pinned", "latest", "default", "mixed", "launch-config", "skip-tag", "other-family",
               "ssm-resolve", "cfn-param", "cfn-resolve", "override-old", "override-other"}
STACK_TAG = "aws:cloudformation:stack-name"


def reset(endpoint):
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30)


@pytest.fixture(scope="module")
def state(endpoint, tmp_path_factory):
    """The small world, provisioned once for this module through the CLI, on an emptied emulator."""
    reset(endpoint)
    out = tmp_path_factory.mktemp("world") / "state.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(LOCAL, "world.py"), "provision",
         "--endpoint", endpoint, "--scale", "small", "--out", str(out), "--region", REGION],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["event"] == "provisioned" and summary["scale"] == "small"
    yield json.loads(out.read_text())
    reset(endpoint)


@pytest.fixture
def aws(endpoint, session_for):
    """(account, service) -> boto3 client in that account, pointed at the emulator."""
    sessions = {}

    def client(account, service):
        if account not in sessions:
            sessions[account] = session_for(account)
        return sessions[account].client(service, endpoint_url=endpoint)

    return client


# ---------------------------------------------------------------------------------------------
# Reading AWS back


def all_groups(asg):
    groups = []
    for page in asg.get_paginator("describe_auto_scaling_groups").paginate(PaginationConfig={"PageSize": 100}):
        groups += page["AutoScalingGroups"]
    return {g["AutoScalingGroupName"]: g for g in groups}


def template_spec(group):
    if group.get("LaunchTemplate"):
        return group["LaunchTemplate"]
    if group.get("MixedInstancesPolicy"):
        return group["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    return None


def configured_ami(client, group):
    """The AMI a group launches, as the plan-worker must work it out: template version or launch
    configuration, $Latest/$Default resolved, resolve:ssm: resolved."""
    ec2, ssm = client("ec2"), client("ssm")
    spec = template_spec(group)
    if spec is None:
        lc = client("autoscaling").describe_launch_configurations(
            LaunchConfigurationNames=[group["LaunchConfigurationName"]])["LaunchConfigurations"][0]
        return lc["ImageId"], None
    versions = ec2.describe_launch_template_versions(
        LaunchTemplateId=spec["LaunchTemplateId"], Versions=[spec["Version"]])["LaunchTemplateVersions"]
    assert len(versions) == 1, versions
    image = versions[0]["LaunchTemplateData"]["ImageId"]
    if image.startswith("resolve:ssm:"):
        return ssm.get_parameter(Name=image[len("resolve:ssm:"):])["Parameter"]["Value"], image
    return image, image


def tags_of(group):
    return {t["Key"]: t["Value"] for t in group.get("Tags", [])}


# ---------------------------------------------------------------------------------------------
# The state file against AWS


def test_state_shape(state, endpoint):
    assert state["endpoint"] == endpoint
    assert state["region"] == REGION and state["role_name"] == "amiflow" and state["hub_account"] == HUB
    assert state["scale"] == "small"
    assert list(state["accounts"]) == [QA, UAT, PROD]
    assert [a["stage"] for a in state["accounts"].values()] == ["qa", "uat", "prod"]
    assert [a["hub"] for a in state["accounts"].values()] == [True, False, False]
    assert state["families"] == [
        {"parameter_name": AL2023, "name_prefix": "golden-al2023-"},
        {"parameter_name": WIN2022, "name_prefix": "golden-win2022-"},
    ]
    amis = state["amis"]
    assert len(amis["history"]) == 3 and amis["current"] == amis["history"][-1]
    assert len({*amis["history"], amis["candidate"], amis["other_family"]}) == 5
    assert state["timings"]["provision_seconds"] > 0
    for acct, a in state["accounts"].items():
        kinds = [g["kind"] for g in a["groups"]]
        assert set(kinds) == SMALL_KINDS | ({"refresh-fail"} if acct == UAT else set())
        assert len(kinds) == len(set(kinds)), "small scale: one group of each kind"
        for g in a["groups"]:
            assert g["name"].startswith(a["stage"] + "-")
            assert g["instances"] == 2
            assert g["expected"] in {"refresh", "skip", "untouched", "rolled-back"}
            assert g["strategy"] in {"launch-template", "cloudformation", None}
            assert (g["launch_template_id"] is None) == (g["kind"] == "launch-config")
            if g["expected"] != "refresh":
                assert g["reason"], g
        expected = {g["kind"]: (g["expected"], g["strategy"]) for g in a["groups"]}
        assert expected["pinned"] == ("refresh", "launch-template")
        assert expected["cfn-param"] == ("refresh", "cloudformation")
        assert expected["cfn-resolve"] == ("skip", "cloudformation")
        assert expected["skip-tag"][0] == expected["other-family"][0] == "untouched"
        assert expected["launch-config"][0] == "skip"
        assert expected["override-old"] == expected["override-other"] == ("refresh", "launch-template")
        overrides = {g["kind"]: g["overrides"] for g in a["groups"] if g["overrides"]}
        assert {k: [o["expected"] for o in v] for k, v in overrides.items()} == {
            "override-old": ["moved"], "override-other": ["left-alone"]}
        by_kind = {g["kind"]: g for g in a["groups"]}
        assert overrides["override-old"][0]["ami_id"] == by_kind["override-old"]["ami_id"] == state["amis"]["current"]
        assert overrides["override-other"][0]["ami_id"] == state["amis"]["other_family"]
        if acct == UAT:
            assert expected["refresh-fail"] == ("rolled-back", "launch-template")


def test_golden_amis_built_in_hub_and_shared(state, aws):
    amis = state["amis"]
    hub = aws(HUB, "ec2")
    images = {i["ImageId"]: i for i in hub.describe_images(
        ImageIds=amis["history"] + [amis["candidate"], amis["other_family"]])["Images"]}
    names = [images[i]["Name"] for i in amis["history"] + [amis["candidate"], amis["other_family"]]]
    assert names == ["golden-al2023-2026-08", "golden-al2023-2026-09", "golden-al2023-2026-10",
                     "golden-al2023-2026-11", "golden-win2022-2026-10"]
    for image_id, month in zip(amis["history"] + [amis["candidate"]], ["08", "09", "10", "11"]):
        assert images[image_id]["OwnerId"] == HUB
        assert images[image_id]["CreationDate"].startswith(f"2026-{month}-01"), images[image_id]["CreationDate"]
        assert tags_of(images[image_id])["amiflow:family"] == "al2023"

    for image_id in amis["history"] + [amis["other_family"]]:
        perms = hub.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
        assert {p["UserId"] for p in perms} == {UAT, PROD}
        for mapping in images[image_id]["BlockDeviceMappings"]:
            if "Ebs" in mapping:
                snap = hub.describe_snapshot_attribute(
                    SnapshotId=mapping["Ebs"]["SnapshotId"], Attribute="createVolumePermission")
                assert {p["UserId"] for p in snap["CreateVolumePermissions"]} == {UAT, PROD}
    assert hub.describe_image_attribute(
        ImageId=amis["candidate"], Attribute="launchPermission")["LaunchPermissions"] == []

    for spoke in (UAT, PROD):
        ec2 = aws(spoke, "ec2")
        seen = {i["ImageId"] for i in ec2.describe_images(ImageIds=amis["history"] + [amis["other_family"]])["Images"]}
        assert seen == set(amis["history"] + [amis["other_family"]])
        with pytest.raises(ClientError) as err:
            ec2.describe_images(ImageIds=[amis["candidate"]])
        assert err.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"


def test_golden_parameters_and_history(state, aws):
    amis = state["amis"]
    for acct in state["accounts"]:
        ssm = aws(acct, "ssm")
        history = ssm.get_parameter_history(Name=AL2023)["Parameters"]
        assert [(h["Version"], h["Value"]) for h in history] == list(zip([1, 2, 3], amis["history"]))
        current = ssm.get_parameter(Name=AL2023)["Parameter"]
        assert (current["Value"], current["Version"], current["DataType"]) == (amis["current"], 3, "aws:ec2:image")
        win = ssm.get_parameter(Name=WIN2022)["Parameter"]
        assert (win["Value"], win["DataType"]) == (amis["other_family"], "aws:ec2:image")


def test_accounts_stages_and_families_are_the_local_policys(state):
    import tomllib
    with open(os.path.join(LOCAL, "amiflow.toml"), "rb") as f:
        policy = tomllib.load(f)
    assert state["hub_account"] == policy["hub_account"] == HUB
    assert state["role_name"] == policy["role_name"]
    assert {acct: a["stage"] for acct, a in state["accounts"].items()} == {
        s["account"]: s["name"] for s in policy["stages"]}
    assert [s for s, _ in world.STAGES] == ["qa", "uat", "prod"]
    assert state["families"] == [{"parameter_name": f["parameter_name"], "name_prefix": f["name_prefix"]}
                                 for f in policy["families"]]
    assert (world.AL2023_PARAMETER, world.WIN2022_PARAMETER) == (AL2023, WIN2022)


def test_queues_with_redrive(state, aws):
    for acct, a in state["accounts"].items():
        sqs = aws(acct, "sqs")
        workers = ["param", "plan", "refresh"] + (["share", "ingest", "audit"] if acct == HUB else [])
        assert set(a["queues"]) == set(workers)
        listed = {u.rsplit("/", 1)[1] for u in sqs.list_queues(QueueNamePrefix="amiflow-").get("QueueUrls", [])}
        assert listed == {f"amiflow-{w}" for w in workers} | {f"amiflow-{w}-dlq" for w in workers}
        for worker, q in a["queues"].items():
            assert sqs.get_queue_url(QueueName=f"amiflow-{worker}")["QueueUrl"] == q["url"]
            assert sqs.get_queue_url(QueueName=f"amiflow-{worker}-dlq")["QueueUrl"] == q["dlq_url"]
            attrs = sqs.get_queue_attributes(QueueUrl=q["url"], AttributeNames=["All"])["Attributes"]
            assert attrs["QueueArn"] == q["arn"] == f"arn:aws:sqs:{REGION}:{acct}:amiflow-{worker}"
            assert attrs["VisibilityTimeout"] == "10"
            assert json.loads(attrs["RedrivePolicy"]) == {"deadLetterTargetArn": q["dlq_arn"], "maxReceiveCount": 5}
            policy = json.loads(attrs["Policy"])
            assert policy["Statement"][0]["Principal"] == {"Service": "events.amazonaws.com"}
            assert policy["Statement"][0]["Action"] == "sqs:SendMessage"
            dlq = sqs.get_queue_attributes(QueueUrl=q["dlq_url"], AttributeNames=["QueueArn"])["Attributes"]
            assert dlq["QueueArn"] == q["dlq_arn"]


def test_buses_policies_and_rules(state, aws):
    for acct, a in state["accounts"].items():
        events = aws(acct, "events")
        bus = events.describe_event_bus(Name="amiflow")
        assert bus["Arn"] == a["bus_arn"] == f"arn:aws:events:{REGION}:{acct}:event-bus/amiflow"
        principals = {s["Principal"]["AWS"].split(":")[4] if s["Principal"]["AWS"].startswith("arn:")
                      else s["Principal"]["AWS"] for s in json.loads(bus["Policy"])["Statement"]}
        assert principals == {QA, UAT, PROD} - {acct}
        on_bus = {r["Name"] for r in events.list_rules(EventBusName="amiflow")["Rules"]}
        on_default = {r["Name"] for r in events.list_rules(EventBusName="default")["Rules"]}
        if acct == HUB:
            assert on_bus == {"amiflow-param", "amiflow-param-recall", "amiflow-plan", "amiflow-refresh",
                              "amiflow-share", "amiflow-audit", "amiflow-audit-log", "amiflow-forward-uat",
                              "amiflow-forward-prod", "amiflow-forward-recall-uat", "amiflow-forward-recall-prod"}
            assert on_default == {"amiflow-refresh-outcomes", "amiflow-ingest-ec2", "amiflow-ingest-imagebuilder"}
        else:
            assert on_bus == {"amiflow-param", "amiflow-param-recall", "amiflow-plan", "amiflow-refresh",
                              "amiflow-forward-hub"}
            assert on_default == {"amiflow-refresh-outcomes"}
        for name in on_bus:
            pattern = json.loads(events.describe_rule(Name=name, EventBusName="amiflow")["EventPattern"])
            assert pattern["source"] == ["amiflow"], name


def test_groups_match_aws(state, aws):
    amis = state["amis"]
    for acct, a in state["accounts"].items():
        client = lambda service, acct=acct: aws(acct, service)  # noqa: E731
        ec2 = client("ec2")
        groups = all_groups(client("autoscaling"))
        assert set(groups) == {g["name"] for g in a["groups"]}
        for g in a["groups"]:
            group = groups[g["name"]]
            kind = g["kind"]
            tags = tags_of(group)
            assert group["DesiredCapacity"] == len(group["Instances"]) == g["instances"], g["name"]
            ami, template_image = configured_ami(client, group)
            assert ami == g["ami_id"], g["name"]
            spec = template_spec(group)
            assert (spec["LaunchTemplateId"] if spec else None) == g["launch_template_id"], g["name"]
            # Every instance really runs that AMI (resolve:ssm: and shared AMIs included).
            ids = [i["InstanceId"] for i in group["Instances"]]
            running = [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]]
            assert {i["ImageId"] for i in running} == {g["ami_id"]}, g["name"]

            if kind in ("pinned", "refresh-fail", "skip-tag", "other-family"):
                assert spec["Version"] == "2"
            if kind == "latest":
                assert spec["Version"] == "$Latest" and g["ami_id"] == amis["history"][1]
            if kind == "default":
                assert spec["Version"] == "$Default"
                lt = ec2.describe_launch_templates(LaunchTemplateIds=[spec["LaunchTemplateId"]])["LaunchTemplates"][0]
                assert (lt["DefaultVersionNumber"], lt["LatestVersionNumber"]) == (2, 3)
            if kind == "mixed":
                assert group["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]["Version"] == "1"
            # Each override with a template of its own, as the state file says (instances launch
            # from the first override, so override-old's run its template's AMI: the group's).
            own = [(o["InstanceType"], o["LaunchTemplateSpecification"]["LaunchTemplateId"])
                   for o in (group.get("MixedInstancesPolicy") or {}).get("LaunchTemplate", {}).get("Overrides", [])
                   if o.get("LaunchTemplateSpecification")]
            assert own == [(o["instance_type"], o["launch_template_id"]) for o in g["overrides"]], g["name"]
            for o in g["overrides"]:
                version = ec2.describe_launch_template_versions(
                    LaunchTemplateId=o["launch_template_id"], Versions=["1"])["LaunchTemplateVersions"][0]
                assert version["LaunchTemplateData"]["ImageId"] == o["ami_id"], g["name"]
            if kind == "launch-config":
                assert group["LaunchConfigurationName"] == g["name"] and g["ami_id"] == amis["history"][1]
            if kind == "ssm-resolve":
                assert template_image == f"resolve:ssm:{AL2023}" and g["ami_id"] == amis["current"]
            if kind == "other-family":
                assert g["ami_id"] == amis["other_family"]
            else:
                assert g["ami_id"] in amis["history"], g["name"]
            assert (tags.get("amiflow:skip") == "true") == (kind == "skip-tag")
            assert (tags.get("amiflow:emulator-refresh-outcome") == "fail") == (kind == "refresh-fail")
            assert (tags.get(STACK_TAG) == g["name"]) == kind.startswith("cfn-"), (g["name"], tags)
            assert (g["strategy"] == "cloudformation") == kind.startswith("cfn-")


def test_stacks_take_the_ami_two_ways(state, aws):
    for acct, a in state["accounts"].items():
        cfn = aws(acct, "cloudformation")
        by_kind = {g["kind"]: g for g in a["groups"]}
        def template(kind):
            body = cfn.get_template(StackName=by_kind[kind]["name"])["TemplateBody"]
            return body if isinstance(body, dict) else json.loads(body)

        def image_of(t):
            return t["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["ImageId"]

        param, resolve = template("cfn-param"), template("cfn-resolve")
        assert param["Parameters"]["ImageId"] == {
            "Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>", "Default": AL2023}
        assert image_of(param) == {"Ref": "ImageId"}
        assert "ImageId" not in resolve["Parameters"]
        assert image_of(resolve) == "{{resolve:ssm:%s}}" % AL2023
        for kind in ("cfn-param", "cfn-resolve"):
            stack = cfn.describe_stacks(StackName=by_kind[kind]["name"])["Stacks"][0]
            assert stack["StackStatus"] == "CREATE_COMPLETE"
            lt = cfn.describe_stack_resource(StackName=stack["StackName"], LogicalResourceId="LaunchTemplate")
            assert lt["StackResourceDetail"]["PhysicalResourceId"] == by_kind[kind]["launch_template_id"]


# ---------------------------------------------------------------------------------------------
# Routing


def detail_for(**fields):
    marker = str(uuid.uuid4())
    base = {"schema_version": 1, "rollout_id": f"{AL2023}@ami-0123456789abcdef0", "key": f"test:{marker}",
            "caused_by": "", "emitted_at": "2026-11-14T02:00:00Z"}
    base.update(fields)
    return base


def put(events, bus, detail_type, detail, source="amiflow", resources=()):
    resp = events.put_events(Entries=[{
        "Source": source, "DetailType": detail_type, "Detail": json.dumps(detail),
        "EventBusName": bus, "Resources": list(resources),
    }])
    assert resp["FailedEntryCount"] == 0, resp


def by_key(body, key):
    return body.get("detail", {}).get("key") == key


def wait_for(sqs, queue_url, key, timeout=15.0, match=by_key):
    """Receive from the queue until the event with detail.key arrives (deleted), or fail at the deadline.
    Other messages are released at once (visibility 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        for m in msgs:
            body = json.loads(m["Body"])
            if match(body, key):
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
                return body
            sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0)
    pytest.fail(f"no event with key {key} in {queue_url} within {timeout}s")


def holds(sqs, queue_url, key, match=by_key):
    """Whether the queue holds the event now, without consuming anything (visibility 0 receive).
    Sound right after a positive wait_for: moto delivers every target inside PutEvents."""
    msgs = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0).get("Messages", [])
    return any(match(json.loads(m["Body"]), key) for m in msgs)


def queue(state, account, worker):
    return state["accounts"][account]["queues"][worker]["url"]


def test_ami_shared_on_hub_bus_reaches_only_the_target_spoke(state, aws):
    d = detail_for(ami_id=state["amis"]["candidate"], region=REGION, source_account=HUB, target_account=UAT,
                   stage="uat", parameter_name=AL2023, created_at="2026-11-01T00:00:00Z")
    put(aws(HUB, "events"), "amiflow", "AmiShared", d)
    body = wait_for(aws(UAT, "sqs"), queue(state, UAT, "param"), d["key"])
    assert body["detail-type"] == "AmiShared" and body["source"] == "amiflow"
    assert body["detail"]["target_account"] == UAT
    assert body["account"] == HUB, "the events shim keeps the producer's account across the forward"
    assert not holds(aws(HUB, "sqs"), queue(state, HUB, "param"), d["key"])
    assert not holds(aws(PROD, "sqs"), queue(state, PROD, "param"), d["key"])

    # The hub is also the qa spoke: its own AmiShared stays in the hub and lands in qa's param queue.
    own = detail_for(ami_id=state["amis"]["candidate"], region=REGION, source_account=HUB, target_account=QA,
                     stage="qa", parameter_name=AL2023, created_at="2026-11-01T00:00:00Z")
    put(aws(HUB, "events"), "amiflow", "AmiShared", own)
    wait_for(aws(HUB, "sqs"), queue(state, HUB, "param"), own["key"])
    assert not holds(aws(UAT, "sqs"), queue(state, UAT, "param"), own["key"])


def test_param_updated_in_prod_reaches_prod_plan_and_hub_audit(state, aws):
    amis = state["amis"]
    d = detail_for(account=PROD, parameter_name=AL2023, ami_id=amis["candidate"],
                   previous_ami_id=amis["current"], parameter_version=4)
    put(aws(PROD, "events"), "amiflow", "ParamUpdated", d)
    planned = wait_for(aws(PROD, "sqs"), queue(state, PROD, "plan"), d["key"])
    assert planned["detail"]["account"] == PROD
    audited = wait_for(aws(HUB, "sqs"), queue(state, HUB, "audit"), d["key"])
    assert audited["detail-type"] == "ParamUpdated" and audited["account"] == PROD
    # The hub's own plan rule wants detail.account = hub: a forwarded prod event must not plan qa.
    assert not holds(aws(HUB, "sqs"), queue(state, HUB, "plan"), d["key"])


def test_autoscaling_refresh_event_on_uat_default_bus_reaches_uat_refresh_queue(state, aws):
    group = next(g for g in state["accounts"][UAT]["groups"] if g["kind"] == "pinned")
    refresh_id = str(uuid.uuid4())
    # AWS's shape (shared/aws-events): detail has InstanceRefreshId and AutoScalingGroupName only,
    # so the test finds its event by refresh id.
    put(aws(UAT, "events"), "default", "EC2 Auto Scaling Instance Refresh Succeeded",
        {"InstanceRefreshId": refresh_id, "AutoScalingGroupName": group["name"]}, source="aws.autoscaling",
        resources=[f"arn:aws:autoscaling:{REGION}:{UAT}:autoScalingGroup:{uuid.uuid4()}"
                   f":autoScalingGroupName/{group['name']}"])
    body = wait_for(aws(UAT, "sqs"), queue(state, UAT, "refresh"), refresh_id,
                    match=lambda b, k: b.get("detail", {}).get("InstanceRefreshId") == k)
    assert body["source"] == "aws.autoscaling" and body["detail"]["AutoScalingGroupName"] == group["name"]
    assert not holds(aws(PROD, "sqs"), queue(state, PROD, "refresh"), refresh_id,
                     match=lambda b, k: b.get("detail", {}).get("InstanceRefreshId") == k)


@pytest.mark.parametrize("account,bus,source,detail_type,fields,worker", [
    (HUB, "amiflow", "amiflow", "AmiBuilt", {"ami_id": "ami-0123456789abcdef0", "parameter_name": AL2023}, "share"),
    (HUB, "default", "aws.ec2", "EC2 AMI State Change", {"State": "available"}, "ingest"),
    (HUB, "default", "aws.imagebuilder", "EC2 Image Builder Image State Change",
     {"state": {"status": "AVAILABLE"}}, "ingest"),
    (UAT, "amiflow", "amiflow", "AsgRefreshRequested", {"account": UAT, "asg_name": "uat-web-pinned"}, "refresh"),
    (UAT, "amiflow", "amiflow", "RolloutWindowOpened", {"account": UAT, "stage": "uat"}, "plan"),
])
def test_each_rule_delivers_to_its_queue(state, aws, account, bus, source, detail_type, fields, worker):
    d = detail_for(**fields)
    put(aws(account, "events"), bus, detail_type, d, source=source)
    body = wait_for(aws(account, "sqs"), queue(state, account, worker), d["key"])
    assert body["detail-type"] == detail_type


def test_asg_refresh_finished_in_uat_is_audited_in_the_hub(state, aws):
    d = detail_for(asg_name="uat-web-pinned", ami_id=state["amis"]["candidate"], outcome="succeeded", reason="")
    put(aws(UAT, "events"), "amiflow", "AsgRefreshFinished", d)
    body = wait_for(aws(HUB, "sqs"), queue(state, HUB, "audit"), d["key"])
    assert body["account"] == UAT
