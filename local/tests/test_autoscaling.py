"""boto3 checks of amiflow_shim.autoscaling against the launcher (AMIFLOW_REFRESH_STEP_SECONDS=0.2).

Every test acts in its own account, so groups, queues and rules never interfere. Progress is observed
by polling with a deadline; nothing waits a fixed time.
"""

import itertools
import json
import re
import time
import urllib.request
from datetime import datetime, timezone

import boto3
import pytest
from botocore.exceptions import ClientError

FAIL_TAG = "amiflow:emulator-refresh-outcome"
ACTIVE = {"Pending", "InProgress", "Baking", "Cancelling", "RollbackInProgress"}
DEADLINE = 30.0

_accounts = itertools.count(1)


class World:
    """One account's clients plus helpers."""

    def __init__(self, session, endpoint, account, default_amis):
        self.account = account
        self._default_amis = default_amis
        self.ec2 = session.client("ec2", endpoint_url=endpoint)
        self.asg = session.client("autoscaling", endpoint_url=endpoint)
        self.sqs = session.client("sqs", endpoint_url=endpoint)
        self.events = session.client("events", endpoint_url=endpoint)
        self.ssm = session.client("ssm", endpoint_url=endpoint)
        self.cloudwatch = session.client("cloudwatch", endpoint_url=endpoint)
        self._queue_url = None

    # --- fixtures in the account ---

    def amis(self, n):
        """n AMI ids from moto's default image list (valid under MOTO_ENABLE_AMI_VALIDATION)."""
        assert len(self._default_amis) >= n
        return self._default_amis[:n]

    def template(self, name, versions):
        """A launch template with one version per dict of LaunchTemplateData (each complete: no
        reliance on SourceVersion inheritance). Returns the template id."""
        lt = self.ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=versions[0])
        for data in versions[1:]:
            self.ec2.create_launch_template_version(LaunchTemplateName=name, LaunchTemplateData=data)
        return lt["LaunchTemplate"]["LaunchTemplateId"]

    def group(self, name, size, tags=(), **source):
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            MinSize=0,
            MaxSize=10,
            DesiredCapacity=size,
            AvailabilityZones=["us-east-1a"],
            Tags=[
                {"Key": k, "Value": v, "PropagateAtLaunch": False, "ResourceId": name, "ResourceType": "auto-scaling-group"}
                for k, v in tags
            ],
            **source,
        )
        return self.describe_group(name)

    def describe_group(self, name):
        return self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]

    def instances(self, name):
        """{instance id: (ImageId, reported LT version, EC2 version tag, InstanceType)} of the group."""
        members = self.describe_group(name)["Instances"]
        if not members:
            return {}
        reported = {i["InstanceId"]: (i.get("LaunchTemplate") or {}).get("Version") for i in members}
        out = {}
        for res in self.ec2.describe_instances(InstanceIds=list(reported))["Reservations"]:
            for i in res["Instances"]:
                tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                out[i["InstanceId"]] = (
                    i["ImageId"],
                    reported[i["InstanceId"]],
                    tags.get("aws:ec2launchtemplate:version"),
                    i["InstanceType"],
                )
                assert i["State"]["Name"] == "running"
        return out

    # --- instance refresh ---

    def refresh(self, name, rid):
        found = self.asg.describe_instance_refreshes(AutoScalingGroupName=name, InstanceRefreshIds=[rid])
        (item,) = found["InstanceRefreshes"]
        return item

    def wait_refresh(self, name, rid, until=None):
        """Poll until the refresh leaves the active statuses (or `until(item)` holds); returns the
        distinct (Status, PercentageComplete, InstancesToUpdate) seen and the last item."""
        seen = []
        deadline = time.monotonic() + DEADLINE
        while True:
            item = self.refresh(name, rid)
            state = (item["Status"], item.get("PercentageComplete"), item.get("InstancesToUpdate"))
            if not seen or seen[-1] != state:
                seen.append(state)
            if (until(item) if until else item["Status"] not in ACTIVE):
                return seen, item
            assert time.monotonic() < deadline, f"refresh {rid} stuck: {seen}"
            time.sleep(0.02)

    # --- events ---

    def listen(self):
        """An SQS queue receiving every aws.autoscaling event of the account's default bus."""
        url = self.sqs.create_queue(QueueName="as-events")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.events.put_rule(Name="as-events", EventPattern=json.dumps({"source": ["aws.autoscaling"]}))
        self.events.put_targets(Rule="as-events", Targets=[{"Id": "q", "Arn": arn}])
        self._queue_url = url
        self._received = []

    def events_until(self, predicate):
        """Read events until predicate(list of events so far) holds; returns them."""
        deadline = time.monotonic() + DEADLINE
        while not predicate(self._received):
            assert time.monotonic() < deadline, f"events so far: {[e['detail-type'] for e in self._received]}"
            got = self.sqs.receive_message(QueueUrl=self._queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for m in got.get("Messages", []):
                self._received.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=m["ReceiptHandle"])
        return list(self._received)

    def refresh_events(self, rid, last):
        """Detail-types of one refresh's events, read until `last` arrives."""
        def mine(evs):
            return [e for e in evs if e["detail"].get("InstanceRefreshId") == rid]

        evs = mine(self.events_until(lambda evs: any(e["detail-type"].endswith(last) for e in mine(evs))))
        return evs


@pytest.fixture(scope="session")
def default_amis(endpoint):
    """Ids of a few of moto's default public AMIs, which every account sees. Looked up once, with a
    name filter: listing all ~1300 default images takes seconds."""
    ec2 = boto3.client(
        "ec2", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["amzn-ami-hvm-*"]}])["Images"]
    return sorted(i["ImageId"] for i in images)


@pytest.fixture
def world(session_for, endpoint, default_amis):
    account = f"{210000000000 + next(_accounts)}"
    return World(session_for(account), endpoint, account, default_amis)


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def statuses(seen):
    """Distinct statuses in the order seen. Pending lasts one step (0.2 s) and may be over before
    the first poll on a loaded machine, so it is left out."""
    out = []
    for s, _pct, _todo in seen:
        if s != "Pending" and (not out or out[-1] != s):
            out.append(s)
    return out


def assert_event_shape(world, event, group_arn, rid, group_name, detail_type):
    assert set(event) == {"version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"}
    assert event["source"] == "aws.autoscaling"
    assert event["detail-type"] == f"EC2 Auto Scaling Instance Refresh {detail_type}"
    assert event["resources"] == [group_arn]
    assert event["region"] == "us-east-1"
    assert event["account"] == world.account  # put back on SQS delivery by amiflow_shim.events
    assert event["version"] == "0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", event["time"]), event["time"]
    expected = {"InstanceRefreshId": rid, "AutoScalingGroupName": group_name}
    if detail_type == "Checkpoint Reached":
        assert set(event["detail"]) == set(expected) | {"CheckpointPercentage", "CheckpointDelay"}
    else:
        assert event["detail"] == expected


# --- instance refresh: success paths -------------------------------------------------------------


def test_refresh_to_exact_version_replaces_instances_and_emits_events(world):
    a, b, c = world.amis(3)
    lt_id = world.template("web", [{"ImageId": x, "InstanceType": "t3.micro"} for x in (a, b, c)])
    group = world.group("web", 4, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    before = world.instances("web")
    assert {v[:3] for v in before.values()} == {(a, "1", "1")}
    world.cloudwatch.put_metric_alarm(
        AlarmName="web-5xx", MetricName="5xx", Namespace="web", Statistic="Sum", Period=60,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold",
    )
    world.listen()

    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="web",
        Strategy="Rolling",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={
            "MinHealthyPercentage": 75, "InstanceWarmup": 0, "SkipMatching": True, "AutoRollback": True,
            "CheckpointPercentages": [50, 100], "CheckpointDelay": 60,
            "AlarmSpecification": {"Alarms": ["web-5xx"]},
        },
    )["InstanceRefreshId"]
    seen, item = world.wait_refresh("web", rid)

    assert statuses(seen) == ["InProgress", "Successful"]
    percentages = [p for s, p, _ in seen if s == "InProgress"]
    assert percentages == sorted(percentages) and len(set(percentages)) >= 3, seen
    assert [t for s, _, t in seen if s == "InProgress"][0] == 4
    assert item["PercentageComplete"] == 100 and item["InstancesToUpdate"] == 0
    assert item["EndTime"] >= item["StartTime"]
    assert item["DesiredConfiguration"] == {"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}}
    assert item["Preferences"]["CheckpointPercentages"] == [50, 100]
    assert item["Preferences"]["AlarmSpecification"] == {"Alarms": ["web-5xx"]}
    assert item["Strategy"] == "Rolling"

    # Exactly the requested version, not $Latest (3): config, instances, AMIs.
    assert world.describe_group("web")["LaunchTemplate"] == {
        "LaunchTemplateId": lt_id, "LaunchTemplateName": "web", "Version": "2",
    }
    after = world.instances("web")
    assert len(after) == 4 and not set(after) & set(before)
    assert {v for v in after.values()} == {(b, "2", "2", "t3.micro")}
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for r in world.ec2.describe_instances(InstanceIds=list(before))["Reservations"]
        for i in r["Instances"]
    }
    assert set(states.values()) == {"terminated"}

    evs = world.refresh_events(rid, "Succeeded")
    kinds = [e["detail-type"].replace("EC2 Auto Scaling Instance Refresh ", "") for e in evs]
    assert kinds == ["Started", "Checkpoint Reached", "Checkpoint Reached", "Succeeded"]
    for e, kind in zip(evs, kinds):
        assert_event_shape(world, e, group["AutoScalingGroupARN"], rid, "web", kind)
    assert [(e["detail"]["CheckpointPercentage"], e["detail"]["CheckpointDelay"]) for e in evs[1:3]] == [
        ("50", "60"), ("100", "60"),
    ]


def test_skip_matching_keeps_instances_already_on_the_desired_version(world):
    a, b = world.amis(2)
    lt_id = world.template("api", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("api", 2, LaunchTemplate={"LaunchTemplateName": "api", "Version": "1"})
    old = set(world.instances("api"))
    # Two more instances, launched from version 2 by the group itself.
    world.asg.update_auto_scaling_group(
        AutoScalingGroupName="api", LaunchTemplate={"LaunchTemplateName": "api", "Version": "2"}, DesiredCapacity=4,
    )
    current = world.instances("api")
    matching = {i for i, v in current.items() if v[:3] == (b, "2", "2")}
    assert len(matching) == 2 and old | matching == set(current)

    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="api",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"SkipMatching": True},
    )["InstanceRefreshId"]
    seen, item = world.wait_refresh("api", rid)
    assert item["Status"] == "Successful"
    in_progress = [(p, t) for s, p, t in seen if s == "InProgress"]
    assert in_progress[0] == (50, 2), seen  # the matching half counts as done from the start

    after = world.instances("api")
    assert matching <= set(after) and not old & set(after)
    assert {v[:3] for v in after.values()} == {(b, "2", "2")}


def test_refresh_without_desired_configuration_follows_latest_resolved_at_start(world):
    a, b = world.amis(2)
    world.template("batch", [{"ImageId": a, "InstanceType": "t3.micro"}])
    world.group("batch", 3, LaunchTemplate={"LaunchTemplateName": "batch", "Version": "$Latest"})
    assert {v[:3] for v in world.instances("batch").values()} == {(a, "$Latest", "1")}
    world.ec2.create_launch_template_version(LaunchTemplateName="batch", LaunchTemplateData={"ImageId": b, "InstanceType": "t3.micro"})

    rid = world.asg.start_instance_refresh(AutoScalingGroupName="batch", Preferences={"MinHealthyPercentage": 50})["InstanceRefreshId"]
    _seen, item = world.wait_refresh("batch", rid)
    assert item["Status"] == "Successful" and "DesiredConfiguration" not in item

    assert world.describe_group("batch")["LaunchTemplate"]["Version"] == "$Latest"
    after = world.instances("batch")
    assert len(after) == 3 and {v[:3] for v in after.values()} == {(b, "$Latest", "2")}


def test_refresh_to_mixed_instances_policy(world):
    a, b = world.amis(2)
    world.template("mix", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])

    def policy(version):
        return {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateName": "mix", "Version": version},
                "Overrides": [{"InstanceType": "t3.small"}, {"InstanceType": "t3.medium"}],
            },
            "InstancesDistribution": {"OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 100},
        }

    world.group("mix", 2, MixedInstancesPolicy=policy("1"))
    assert {v for v in world.instances("mix").values()} == {(a, "1", "1", "t3.small")}

    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="mix", DesiredConfiguration={"MixedInstancesPolicy": policy("2")},
    )["InstanceRefreshId"]
    _seen, item = world.wait_refresh("mix", rid)
    assert item["Status"] == "Successful"

    g = world.describe_group("mix")
    assert "LaunchTemplate" not in g
    spec = g["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert (spec["LaunchTemplateName"], spec["Version"]) == ("mix", "2")
    assert [o["InstanceType"] for o in g["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]] == ["t3.small", "t3.medium"]
    assert {v for v in world.instances("mix").values()} == {(b, "2", "2", "t3.small")}


def test_an_override_with_its_own_launch_template_launches_from_it(world):
    """A MixedInstancesPolicy override naming a second template: instances of the override's type
    (the first, highest-priority override) run that template's AMI; a refresh whose desired
    configuration moves the override's version replaces them, and SkipMatching compares the
    override's template."""
    a, b = world.amis(2)
    world.template("main", [{"ImageId": b, "InstanceType": "t3.micro"}])
    other = world.template("other", [{"ImageId": a, "InstanceType": "t3.small"}, {"ImageId": b, "InstanceType": "t3.small"}])

    def policy(version):
        return {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateName": "main", "Version": "1"},
                "Overrides": [
                    {"InstanceType": "t3.small", "LaunchTemplateSpecification": {"LaunchTemplateId": other, "Version": version}},
                    {"InstanceType": "t3.micro"},
                ],
            },
            "InstancesDistribution": {"OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 100},
        }

    world.group("over", 2, MixedInstancesPolicy=policy("1"))
    g = world.describe_group("over")
    first = g["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"][0]
    assert (first["LaunchTemplateSpecification"]["LaunchTemplateId"], first["LaunchTemplateSpecification"]["Version"]) == (other, "1")
    assert set(world.instances("over").values()) == {(a, "1", "1", "t3.small")}

    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="over", DesiredConfiguration={"MixedInstancesPolicy": policy("2")},
        Preferences={"SkipMatching": True},
    )["InstanceRefreshId"]
    _seen, item = world.wait_refresh("over", rid)
    assert item["Status"] == "Successful"
    assert set(world.instances("over").values()) == {(b, "2", "2", "t3.small")}
    first = world.describe_group("over")["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"][0]
    assert first["LaunchTemplateSpecification"]["Version"] == "2"

    # The same configuration again: every instance already launched from the override's version 2.
    before = set(world.instances("over"))
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="over", DesiredConfiguration={"MixedInstancesPolicy": policy("2")},
        Preferences={"SkipMatching": True},
    )["InstanceRefreshId"]
    _seen, item = world.wait_refresh("over", rid)
    assert item["Status"] == "Successful"
    assert set(world.instances("over")) == before


def test_an_override_naming_a_missing_template_is_refused(world):
    (a,) = world.amis(1)
    world.template("alone", [{"ImageId": a, "InstanceType": "t3.micro"}])
    with pytest.raises(ClientError) as e:
        world.group("gone", 1, MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateName": "alone", "Version": "1"},
                "Overrides": [{"InstanceType": "t3.small", "LaunchTemplateSpecification": {"LaunchTemplateName": "nowhere"}}],
            },
        })
    assert e.value.response["Error"]["Code"] == "ValidationError"
    assert "does not exist" in e.value.response["Error"]["Message"]


def test_events_arrive_when_nobody_polls(world):
    """Only SQS is read: the ticker thread, not Auto Scaling requests, advances the refresh."""
    a, b = world.amis(2)
    lt_id = world.template("quiet", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("quiet", 2, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.listen()
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="quiet",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
    )["InstanceRefreshId"]
    evs = world.refresh_events(rid, "Succeeded")
    assert [e["detail-type"][len("EC2 Auto Scaling Instance Refresh "):] for e in evs] == ["Started", "Succeeded"]


def _watch_group(world, name, rid):
    """Poll the group while its refresh runs: the distinct shapes seen (how many instances run
    each launch template version, as sorted (version, count) tuples), and the refresh's statuses
    and last item. One Auto Scaling call each: a phase lasts one step (0.2 s)."""
    shapes, seen = [], []
    deadline = time.monotonic() + DEADLINE
    while True:
        versions = [i["LaunchTemplate"]["Version"] for i in world.describe_group(name)["Instances"]]
        shape = tuple(sorted((v, versions.count(v)) for v in set(versions)))
        if not shapes or shapes[-1] != shape:
            shapes.append(shape)
        item = world.refresh(name, rid)
        if not seen or seen[-1] != item["Status"]:
            seen.append(item["Status"])
        if item["Status"] not in ACTIVE:
            return shapes, seen, item
        assert time.monotonic() < deadline, f"refresh {rid} stuck: {seen}"
        time.sleep(0.02)


def test_max_healthy_percentage_above_100_launches_before_terminating_and_bake_time_bakes(world):
    a, b = world.amis(2)
    lt_id = world.template("surge", [{"ImageId": x, "InstanceType": "t3.micro"} for x in (a, b)])
    world.group("surge", 2, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="surge",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "BakeTime": 900, "SkipMatching": True},
    )["InstanceRefreshId"]
    shapes, seen, item = _watch_group(world, "surge", rid)
    # The whole group (200% of it) ran at once: both replacements in service beside both
    # originals, and never fewer than two instances on the old AMI before the new ones were there.
    assert shapes == [(("1", 2),), (("1", 2), ("2", 2)), (("2", 2),)], shapes
    assert {v[0] for v in world.instances("surge").values()} == {b}
    assert [s for s in seen if s != "Pending"] == ["InProgress", "Baking", "Successful"], seen
    prefs = item["Preferences"]
    assert (prefs["MinHealthyPercentage"], prefs["MaxHealthyPercentage"], prefs["BakeTime"]) == (100, 200, 900)
    assert world.describe_group("surge")["DesiredCapacity"] == 2


def test_max_healthy_percentage_100_never_runs_above_the_desired_capacity(world):
    a, b = world.amis(2)
    lt_id = world.template("steady", [{"ImageId": x, "InstanceType": "t3.micro"} for x in (a, b)])
    world.group("steady", 4, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="steady",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"MinHealthyPercentage": 50},
    )["InstanceRefreshId"]
    shapes, seen, item = _watch_group(world, "steady", rid)
    assert item["Status"] == "Successful" and "Baking" not in seen, seen
    assert all(sum(n for _, n in shape) == 4 for shape in shapes), shapes
    assert shapes[-1] == (("2", 4),)
    assert {v[0] for v in world.instances("steady").values()} == {b}
    assert "MaxHealthyPercentage" not in item["Preferences"] and "BakeTime" not in item["Preferences"]


def test_a_launch_before_terminate_batch_that_fails_its_health_checks_leaves_the_originals(world):
    a, b = world.amis(2)
    lt_id = world.template("surge-bad", [{"ImageId": x, "InstanceType": "t3.micro"} for x in (a, b)])
    world.group("surge-bad", 2, tags=[(FAIL_TAG, "fail")], LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    before = set(world.instances("surge-bad"))
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="surge-bad",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200, "AutoRollback": True},
    )["InstanceRefreshId"]
    shapes, seen, item = _watch_group(world, "surge-bad", rid)
    assert item["Status"] == "RollbackSuccessful", seen
    assert (("1", 2), ("2", 2)) in shapes, shapes
    # The replacements were terminated; the instances they would have replaced never left.
    assert set(world.instances("surge-bad")) == before


def test_refresh_preferences_outside_aws_bounds_are_refused(world):
    a, b = world.amis(2)
    lt_id = world.template("bounds", [{"ImageId": x, "InstanceType": "t3.micro"} for x in (a, b)])
    world.group("bounds", 1, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    for prefs, member, bound in [
        ({"MinHealthyPercentage": 100, "MaxHealthyPercentage": 201}, "preferences.maxHealthyPercentage", "less than or equal to 200"),
        ({"BakeTime": 172801}, "preferences.bakeTime", "less than or equal to 172800"),
        ({"MinHealthyPercentage": 101}, "preferences.minHealthyPercentage", "less than or equal to 100"),
    ]:
        with pytest.raises(ClientError) as err:
            world.asg.start_instance_refresh(AutoScalingGroupName="bounds", Preferences=prefs)
        message = err.value.response["Error"]["Message"]
        assert error_code(err) == "ValidationError" and member in message and bound in message, message
    with pytest.raises(ClientError) as err:
        world.asg.start_instance_refresh(
            AutoScalingGroupName="bounds", Preferences={"MinHealthyPercentage": 50, "MaxHealthyPercentage": 160},
        )
    assert "can't be greater than 100" in err.value.response["Error"]["Message"]
    # The largest bake AWS allows is taken.
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="bounds", Preferences={"BakeTime": 172800},
    )["InstanceRefreshId"]
    assert world.refresh("bounds", rid)["Preferences"]["BakeTime"] == 172800


# --- failure injection and rollback --------------------------------------------------------------


def test_failing_refresh_with_auto_rollback_restores_group(world):
    a, b = world.amis(2)
    lt_id = world.template("bad", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    group = world.group("bad", 3, tags=[(FAIL_TAG, "fail")], LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.listen()

    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="bad",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"AutoRollback": True, "MinHealthyPercentage": 66},
    )["InstanceRefreshId"]
    seen, item = world.wait_refresh("bad", rid)

    assert statuses(seen) == ["InProgress", "RollbackInProgress", "RollbackSuccessful"]
    assert "health checks" in item["StatusReason"]
    assert "health checks" in item["RollbackDetails"]["RollbackReason"]
    assert item["RollbackDetails"]["InstancesToUpdateOnRollback"] == 3
    assert world.describe_group("bad")["LaunchTemplate"] == {"LaunchTemplateId": lt_id, "LaunchTemplateName": "bad", "Version": "1"}
    after = world.instances("bad")
    assert len(after) == 3 and {v[:3] for v in after.values()} == {(a, "1", "1")}

    evs = world.refresh_events(rid, "Rollback Succeeded")
    kinds = [e["detail-type"][len("EC2 Auto Scaling Instance Refresh "):] for e in evs]
    assert kinds == ["Started", "Rollback Started", "Rollback Succeeded"]
    for e, kind in zip(evs, kinds):
        assert_event_shape(world, e, group["AutoScalingGroupARN"], rid, "bad", kind)


def test_failing_refresh_without_auto_rollback_fails(world):
    a, b = world.amis(2)
    lt_id = world.template("bad2", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("bad2", 2, tags=[(FAIL_TAG, "fail")], LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.listen()
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="bad2",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
    )["InstanceRefreshId"]
    seen, item = world.wait_refresh("bad2", rid)
    assert statuses(seen) == ["InProgress", "Failed"]
    assert "health checks" in item["StatusReason"] and "RollbackDetails" not in item
    assert world.describe_group("bad2")["LaunchTemplate"]["Version"] == "1"
    after = world.instances("bad2")
    assert len(after) == 2 and {v[:3] for v in after.values()} == {(a, "1", "1")}
    evs = world.refresh_events(rid, "Failed")
    assert [e["detail-type"] for e in evs][-1] == "EC2 Auto Scaling Instance Refresh Failed"


def test_a_held_refresh_stays_in_progress_until_cancelled(world):
    a, b = world.amis(2)
    lt_id = world.template("held", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("held", 2, tags=[(FAIL_TAG, "hold")], LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.listen()
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="held",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
    )["InstanceRefreshId"]
    world.wait_refresh("held", rid, until=lambda it: it["Status"] == "InProgress")
    # A refresh of two instances would have ended within a few steps (0.2 s each): long after, this
    # one still runs and has replaced nothing.
    _seen, item = world.wait_refresh(
        "held", rid, until=lambda it: (datetime.now(timezone.utc) - it["StartTime"]).total_seconds() >= 2)
    assert item["Status"] == "InProgress" and item.get("PercentageComplete", 0) == 0, item
    assert {v[:3] for v in world.instances("held").values()} == {(a, "1", "1")}
    assert world.asg.cancel_instance_refresh(AutoScalingGroupName="held")["InstanceRefreshId"] == rid
    seen, item = world.wait_refresh("held", rid)
    assert statuses(seen)[-2:] == ["Cancelling", "Cancelled"]
    assert world.describe_group("held")["LaunchTemplate"]["Version"] == "1"


def test_alarm_in_alarm_state_rolls_back(world):
    a, b = world.amis(2)
    lt_id = world.template("alarmed", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("alarmed", 6, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.cloudwatch.put_metric_alarm(
        AlarmName="errors", MetricName="e", Namespace="n", Statistic="Sum", Period=60,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold",
    )
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="alarmed",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"AutoRollback": True, "AlarmSpecification": {"Alarms": ["errors"]}},
    )["InstanceRefreshId"]
    world.wait_refresh("alarmed", rid, until=lambda it: it["Status"] == "InProgress" and it["PercentageComplete"] > 0)
    world.cloudwatch.set_alarm_state(AlarmName="errors", StateValue="ALARM", StateReason="test")
    seen, item = world.wait_refresh("alarmed", rid)
    assert item["Status"] == "RollbackSuccessful" and "errors" in item["StatusReason"], seen
    assert {v[:3] for v in world.instances("alarmed").values()} == {(a, "1", "1")}


def test_manual_rollback_restores_previous_version(world):
    a, b = world.amis(2)
    lt_id = world.template("roll", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    group = world.group("roll", 6, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.listen()
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="roll",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
    )["InstanceRefreshId"]
    _seen, mid = world.wait_refresh("roll", rid, until=lambda it: it["Status"] == "InProgress" and it["PercentageComplete"] > 0)
    assert mid["PercentageComplete"] < 100, mid
    # One request: a second one could already see the next batch (the ticker runs in between).
    members = world.describe_group("roll")["Instances"]
    assert any(m["LaunchTemplate"]["Version"] == "2" for m in members)

    assert world.asg.rollback_instance_refresh(AutoScalingGroupName="roll")["InstanceRefreshId"] == rid
    seen, item = world.wait_refresh("roll", rid)
    assert statuses(seen)[-1] == "RollbackSuccessful"
    assert item["RollbackDetails"]["PercentageCompleteOnRollback"] >= mid["PercentageComplete"]
    assert world.describe_group("roll")["LaunchTemplate"]["Version"] == "1"
    after = world.instances("roll")
    assert len(after) == 6 and {v[:3] for v in after.values()} == {(a, "1", "1")}
    evs = world.refresh_events(rid, "Rollback Succeeded")
    kinds = [e["detail-type"][len("EC2 Auto Scaling Instance Refresh "):] for e in evs]
    assert kinds == ["Started", "Rollback Started", "Rollback Succeeded"]
    assert evs[0]["resources"] == [group["AutoScalingGroupARN"]]


# --- errors, cancel, describe --------------------------------------------------------------------


def test_one_active_refresh_cancel_and_error_codes(world):
    a, b = world.amis(2)
    lt_id = world.template("busy", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("busy", 6, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    world.listen()
    desired = {"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}}

    with pytest.raises(ClientError) as err:
        world.asg.cancel_instance_refresh(AutoScalingGroupName="busy")
    assert error_code(err) == "ActiveInstanceRefreshNotFound"
    assert "busy" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as err:
        world.asg.rollback_instance_refresh(AutoScalingGroupName="busy")
    assert error_code(err) == "ActiveInstanceRefreshNotFound"

    rid = world.asg.start_instance_refresh(AutoScalingGroupName="busy", DesiredConfiguration=desired)["InstanceRefreshId"]
    with pytest.raises(ClientError) as err:
        world.asg.start_instance_refresh(AutoScalingGroupName="busy", DesiredConfiguration=desired)
    assert error_code(err) == "InstanceRefreshInProgress"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400

    assert world.asg.cancel_instance_refresh(AutoScalingGroupName="busy")["InstanceRefreshId"] == rid
    seen, item = world.wait_refresh("busy", rid)
    assert statuses(seen)[-2:] == ["Cancelling", "Cancelled"]
    assert item.get("PercentageComplete", 0) < 100, seen
    assert world.describe_group("busy")["LaunchTemplate"]["Version"] == "1"  # never applied
    evs = world.refresh_events(rid, "Cancelled")
    assert evs[-1]["detail"] == {"InstanceRefreshId": rid, "AutoScalingGroupName": "busy"}
    with pytest.raises(ClientError) as err:
        world.asg.cancel_instance_refresh(AutoScalingGroupName="busy")
    assert error_code(err) == "ActiveInstanceRefreshNotFound"

    # AutoRollback needs a desired configuration (AWS's ValidationError).
    with pytest.raises(ClientError) as err:
        world.asg.start_instance_refresh(AutoScalingGroupName="busy", Preferences={"AutoRollback": True})
    assert error_code(err) == "ValidationError" and "DesiredConfiguration" in err.value.response["Error"]["Message"]
    # An unknown version in the desired configuration.
    with pytest.raises(ClientError) as err:
        world.asg.start_instance_refresh(
            AutoScalingGroupName="busy", DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "9"}},
        )
    assert error_code(err) == "ValidationError"
    with pytest.raises(ClientError) as err:
        world.asg.start_instance_refresh(AutoScalingGroupName="nope")
    assert error_code(err) == "ValidationError"


def test_rollback_is_irreversible_without_pinned_version_or_desired_configuration(world):
    a, b = world.amis(2)
    lt_id = world.template("irr", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    desired = {"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}}

    def rollback_code(group, **start):
        world.asg.start_instance_refresh(AutoScalingGroupName=group, **start)
        with pytest.raises(ClientError) as err:
            world.asg.rollback_instance_refresh(AutoScalingGroupName=group)
        world.asg.cancel_instance_refresh(AutoScalingGroupName=group)
        return error_code(err)

    # No desired configuration.
    world.group("irr-pinned", 6, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    assert rollback_code("irr-pinned") == "IrreversibleInstanceRefresh"
    # $Latest and $Default groups.
    for version in ("$Latest", "$Default"):
        name = "irr-" + version[1:].lower()
        world.group(name, 6, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": version})
        with pytest.raises(ClientError) as err:
            world.asg.start_instance_refresh(
                AutoScalingGroupName=name, DesiredConfiguration=desired, Preferences={"AutoRollback": True},
            )
        assert error_code(err) == "ValidationError"
        assert rollback_code(name, DesiredConfiguration=desired) == "IrreversibleInstanceRefresh"
    # A template whose ImageId is an SSM parameter.
    world.ssm.put_parameter(Name="/golden/irr", Value=a, Type="String", DataType="aws:ec2:image")
    world.template("irr-ssm", [{"ImageId": "resolve:ssm:/golden/irr", "InstanceType": "t3.micro"}])
    world.group("irr-ssm", 6, LaunchTemplate={"LaunchTemplateName": "irr-ssm", "Version": "1"})
    assert rollback_code("irr-ssm", DesiredConfiguration=desired) == "IrreversibleInstanceRefresh"


def test_describe_newest_first_with_paging(world):
    a, b = world.amis(2)
    lt_id = world.template("pages", [{"ImageId": a, "InstanceType": "t3.micro"}, {"ImageId": b, "InstanceType": "t3.micro"}])
    world.group("pages", 1, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    ids = []
    for version in ("2", "1", "2"):
        rid = world.asg.start_instance_refresh(
            AutoScalingGroupName="pages",
            DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": version}},
        )["InstanceRefreshId"]
        assert world.wait_refresh("pages", rid)[1]["Status"] == "Successful"
        ids.append(rid)
    newest_first = ids[::-1]

    everything = world.asg.describe_instance_refreshes(AutoScalingGroupName="pages")
    assert [r["InstanceRefreshId"] for r in everything["InstanceRefreshes"]] == newest_first
    assert "NextToken" not in everything
    first = world.asg.describe_instance_refreshes(AutoScalingGroupName="pages", MaxRecords=2)
    assert [r["InstanceRefreshId"] for r in first["InstanceRefreshes"]] == newest_first[:2]
    second = world.asg.describe_instance_refreshes(AutoScalingGroupName="pages", MaxRecords=2, NextToken=first["NextToken"])
    assert [r["InstanceRefreshId"] for r in second["InstanceRefreshes"]] == newest_first[2:]
    assert "NextToken" not in second
    by_id = world.asg.describe_instance_refreshes(AutoScalingGroupName="pages", InstanceRefreshIds=[ids[0], ids[2]])
    assert [r["InstanceRefreshId"] for r in by_id["InstanceRefreshes"]] == [ids[2], ids[0]]
    with pytest.raises(ClientError) as err:
        world.asg.describe_instance_refreshes(AutoScalingGroupName="pages", NextToken="bogus")
    assert error_code(err) == "InvalidNextToken"
    assert world.asg.describe_instance_refreshes(AutoScalingGroupName="other")["InstanceRefreshes"] == []


# --- moto's group-launch bugs --------------------------------------------------------------------


def test_group_launches_take_every_field_from_the_requested_version(world):
    a, b = world.amis(2)
    sg1 = world.ec2.create_security_group(GroupName="one", Description="one")["GroupId"]
    sg2 = world.ec2.create_security_group(GroupName="two", Description="two")["GroupId"]

    def data(ami, key, sg, role):
        return {
            "ImageId": ami, "InstanceType": "t3.micro", "KeyName": key, "SecurityGroupIds": [sg],
            "UserData": "IyEvYmluL3NoCmVjaG8gaGk=",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "role", "Value": role}]}],
        }

    lt_id = world.template("full", [data(a, "key-1", sg1, "v1"), data(b, "key-2", sg2, "v2")])
    world.group("full", 2, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "2"})  # default stays 1
    members = world.describe_group("full")["Instances"]
    assert {m["LaunchTemplate"]["Version"] for m in members} == {"2"}
    for res in world.ec2.describe_instances(InstanceIds=[m["InstanceId"] for m in members])["Reservations"]:
        for i in res["Instances"]:
            tags = {t["Key"]: t["Value"] for t in i["Tags"]}
            assert (i["ImageId"], i["KeyName"], tags["role"], tags["aws:ec2launchtemplate:version"]) == (b, "key-2", "v2", "2")
            assert [g["GroupId"] for g in i["SecurityGroups"]] == [sg2]

    # $Default is resolved at each launch.
    world.group("dflt", 1, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "$Default"})
    world.ec2.modify_launch_template(LaunchTemplateId=lt_id, DefaultVersion="2")
    world.asg.set_desired_capacity(AutoScalingGroupName="dflt", DesiredCapacity=2)
    got = sorted(v[:3] for v in world.instances("dflt").values())
    assert got == sorted([(a, "$Default", "1"), (b, "$Default", "2")])
    described = world.asg.describe_auto_scaling_instances(InstanceIds=list(world.instances("dflt")))
    assert {i["LaunchTemplate"]["Version"] for i in described["AutoScalingInstances"]} == {"$Default"}


def test_update_without_mixed_instances_policy_keeps_it(world):
    (a,) = world.amis(1)
    world.template("keep", [{"ImageId": a, "InstanceType": "t3.micro"}])
    mixed = {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": {"LaunchTemplateName": "keep", "Version": "1"},
            "Overrides": [{"InstanceType": "t3.small"}],
        }
    }
    world.group("keep", 1, MixedInstancesPolicy=mixed)
    before = world.describe_group("keep")["MixedInstancesPolicy"]
    world.asg.update_auto_scaling_group(AutoScalingGroupName="keep", MaxSize=7, DesiredCapacity=2)
    g = world.describe_group("keep")
    assert g["MaxSize"] == 7 and g["MixedInstancesPolicy"] == before and "LaunchTemplate" not in g
    members = world.instances("keep")
    assert len(members) == 2 and {(v[0], v[3]) for v in members.values()} == {(a, "t3.small")}


def test_resolve_ssm_image_id_uses_the_parameter_value_at_launch(world):
    a, b = world.amis(2)
    world.ssm.put_parameter(Name="/golden/web", Value=a, Type="String", DataType="aws:ec2:image")
    world.template("ssm", [{"ImageId": "resolve:ssm:/golden/web", "InstanceType": "t3.micro"}])
    world.group("ssm", 1, LaunchTemplate={"LaunchTemplateName": "ssm", "Version": "1"})
    assert {v[0] for v in world.instances("ssm").values()} == {a}

    world.ssm.put_parameter(Name="/golden/web", Value=b, Type="String", DataType="aws:ec2:image", Overwrite=True)
    world.asg.set_desired_capacity(AutoScalingGroupName="ssm", DesiredCapacity=2)
    assert sorted(v[0] for v in world.instances("ssm").values()) == sorted([a, b])

    rid = world.asg.start_instance_refresh(AutoScalingGroupName="ssm")["InstanceRefreshId"]
    assert world.wait_refresh("ssm", rid)[1]["Status"] == "Successful"
    assert {v[0] for v in world.instances("ssm").values()} == {b}

    # A launch that cannot happen fails the refresh (not the request that happened to advance it).
    world.ssm.delete_parameter(Name="/golden/web")
    rid = world.asg.start_instance_refresh(AutoScalingGroupName="ssm")["InstanceRefreshId"]
    _seen, item = world.wait_refresh("ssm", rid)
    assert item["Status"] == "Failed" and "/golden/web" in item["StatusReason"], item
    assert {v[0] for v in world.instances("ssm").values()} == {b} and len(world.instances("ssm")) == 2


def test_refresh_run_times_are_reported_for_benchmarks(world, endpoint):
    a, b = world.amis(2)
    lt_id = world.template("timed", [{"ImageId": x, "InstanceType": "t3.micro"} for x in (a, b)])
    world.group("timed", 2, LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "1"})
    rid = world.asg.start_instance_refresh(
        AutoScalingGroupName="timed",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": lt_id, "Version": "2"}},
        Preferences={"MinHealthyPercentage": 50},
    )["InstanceRefreshId"]
    _, item = world.wait_refresh("timed", rid)
    with urllib.request.urlopen(f"{endpoint}/amiflow-emulator/refreshes") as resp:
        rows = [r for r in json.load(resp)["refreshes"] if r["id"] == rid]
    assert [(r["account"], r["group"], r["status"]) for r in rows] == [(world.account, "timed", "Successful")]
    ran = (item["EndTime"] - item["StartTime"]).total_seconds()
    assert ran > 0 and rows[0]["seconds"] == pytest.approx(ran, abs=1.0)
