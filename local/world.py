"""Provision amiflow's local world: a hub and three stage accounts inside a running moto server.

The world is what DESIGN.md section 2 draws, built through boto3 exactly as it would be in AWS:
an `amiflow` bus per account (with a bus policy for the other accounts), one queue + DLQ per
worker, the routing rules, golden AMIs built in the hub and shared with the spokes, the golden
parameters with their history, and a mix of Auto Scaling groups that covers every case the plan
and refresh workers must tell apart. Each group records what a rollout of the candidate AMI is
expected to do to it (and to each mixed-instances override's own launch template), so
end-to-end tests can compare outcomes with intent.

    python local/world.py provision --endpoint URL --scale small|seed --out STATE.json [--no-messaging]

``--no-messaging`` builds only the AMIs, parameters and groups: the buses, queues and rules then
come from deploy/hub.yaml and deploy/spoke.yaml through CloudFormation (tests/tests/deploy.rs).

The state file is the contract with the Rust side (crates/emulator, tests/): keep its names.
"""

import argparse
import itertools
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import tomllib
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# The accounts, stages and families are the local rollout policy's: the workers run with that
# file, so the world is built from it rather than from a copy.
POLICY_FILE = Path(__file__).resolve().parent / "amiflow.toml"
with POLICY_FILE.open("rb") as _f:
    POLICY = tomllib.load(_f)
ROLE_NAME = POLICY["role_name"]
HUB_ACCOUNT = POLICY["hub_account"]
# Stage order matters: the rollout goes qa, then uat, then prod (the policy's order).
STAGES = [(stage["name"], stage["account"]) for stage in POLICY["stages"]]
BUS_NAME = "amiflow"
SPOKE_WORKERS = ["param", "plan", "refresh"]
HUB_WORKERS = ["share", "ingest", "audit"]
MAX_RECEIVE_COUNT = 5
# A worker extends the visibility of what it works on every half timeout (the runtime's
# heartbeat), so a short timeout costs a few calls and no duplicate work; what it buys is that a
# killed worker's in-flight messages come back within seconds once it is started again.
VISIBILITY_TIMEOUT = 10
# The hub's audit trail (amictl trace): every AmiBuilt, AmiShared, ParamUpdated,
# AsgRefreshFinished and AmiRecalled the hub bus sees, its own and those the spokes forward.
AUDIT_LOG_GROUP = "/amiflow/audit"
AUDIT_DETAIL_TYPES = ["AmiBuilt", "AmiShared", "ParamUpdated", "AsgRefreshFinished", "AmiRecalled"]

FAMILIES = [{"parameter_name": f["parameter_name"], "name_prefix": f["name_prefix"]}
            for f in POLICY["families"]]


def family_parameter(name_prefix):
    """The golden parameter of the policy's family whose AMI names start with `name_prefix`."""
    return next(f["parameter_name"] for f in FAMILIES if f["name_prefix"] == name_prefix)


AL2023_PARAMETER = family_parameter("golden-al2023-")
WIN2022_PARAMETER = family_parameter("golden-win2022-")
# (name, family, creation date). The history is what the parameter held, oldest first; the
# candidate is what the next rollout will share and publish, so it starts unshared.
AL2023_HISTORY = [
    ("golden-al2023-2026-08", "al2023", "2026-08-01T00:00:00.000Z"),
    ("golden-al2023-2026-09", "al2023", "2026-09-01T00:00:00.000Z"),
    ("golden-al2023-2026-10", "al2023", "2026-10-01T00:00:00.000Z"),
]
AL2023_CANDIDATE = ("golden-al2023-2026-11", "al2023", "2026-11-01T00:00:00.000Z")
WIN2022_CURRENT = ("golden-win2022-2026-10", "win2022", "2026-10-01T00:00:00.000Z")
# The ec2 shim turns this tag into the AMI's CreationDate (moto stamps "now" otherwise), so
# "never regress" checks in the param-worker see a realistic monthly history.
CREATION_DATE_TAG = "amiflow:emulator-creation-date"
# The autoscaling shim makes a refresh of a group with this tag fail (then auto roll back).
REFRESH_OUTCOME_TAG = "amiflow:emulator-refresh-outcome"
SKIP_TAG = "amiflow:skip"

INSTANCE_TYPE = "t3.micro"
APPS = ["web", "api", "worker", "batch", "cache", "search", "auth", "billing", "report", "ingest",
        "media", "notify", "gateway", "ledger", "catalog", "orders"]

# Kinds of group. Refreshable kinds make up the bulk of the seed world.
REFRESHABLE_KINDS = ["pinned", "latest", "default", "mixed"]
SPECIAL_KINDS = ["launch-config", "skip-tag", "other-family", "ssm-resolve", "cfn-param", "cfn-resolve"]
UAT_ONLY_KINDS = ["refresh-fail"]
# Mixed-instances groups whose t3.small override launches from a launch template of its own: on
# the group's golden AMI (the override must move with the main template; it is the first override,
# so the instances launch from it), or on another family's AMI (left alone; second, so the
# instances launch from the main template). Small scale only: the seed world, which the
# benchmarks run, keeps its size.
OVERRIDE_KINDS = ["override-old", "override-other"]

# What a rollout of the candidate should do to each kind: (expected, strategy, reason).
# strategy is what the plan-worker puts in AsgRefreshRequested (DESIGN 4: cloudformation for a
# stack-owned group, else launch-template), null where no request is expected at all.
EXPECTATIONS = {
    "pinned": ("refresh", "launch-template", None),
    "latest": ("refresh", "launch-template", None),
    "default": ("refresh", "launch-template", None),
    "mixed": ("refresh", "launch-template", None),
    "override-old": ("refresh", "launch-template", None),
    "override-other": ("refresh", "launch-template", None),
    "ssm-resolve": ("refresh", "launch-template", None),
    "cfn-param": ("refresh", "cloudformation", None),
    "launch-config": (
        "skip", "launch-template",
        "the group uses a launch configuration, which cannot be updated; move it to a launch template",
    ),
    "cfn-resolve": (
        "skip", "cloudformation",
        "the stack reads the AMI through a {{resolve:ssm:...}} dynamic reference, which a stack update "
        "does not re-resolve; take it through an AWS::SSM::Parameter::Value<AWS::EC2::Image::Id> parameter",
    ),
    "skip-tag": ("untouched", None, "the group is tagged amiflow:skip=true"),
    "other-family": ("untouched", None, "the group runs golden-win2022, another image family"),
    "refresh-fail": (
        "rolled-back", "launch-template",
        "the emulator fails this group's instance refresh (amiflow:emulator-refresh-outcome=fail) and auto rollback undoes it",
    ),
}

SCALES = {
    # instances per group; total instances per stage for the bulk (None: one group per kind)
    "small": {"group_size": 2, "targets": None},
    "seed": {"group_size": 10, "targets": {"qa": 1000, "uat": 1500, "prod": 2000}},
}
# Seed groups vary around ten instances so totals and sizes are not suspiciously round.
SEED_SIZES = [8, 10, 12, 10, 9, 11]

CLIENT_CONFIG = Config(retries={"max_attempts": 8, "mode": "standard"}, max_pool_connections=16)


def bus_arn(account, region):
    return f"arn:aws:events:{region}:{account}:event-bus/{BUS_NAME}"


def workers_for(account):
    return SPOKE_WORKERS + (HUB_WORKERS if account == HUB_ACCOUNT else [])


def session_for(endpoint, account, region):
    """A boto3 Session acting in `account`, as amiflow's workers do: AssumeRole into its role."""
    sts = boto3.client(
        "sts", endpoint_url=endpoint, region_name=region,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    creds = sts.assume_role(
        RoleArn=f"arn:aws:iam::{account}:role/{ROLE_NAME}", RoleSessionName="amiflow-world",
    )["Credentials"]
    return boto3.Session(
        aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"], region_name=region,
    )


class Account:
    """Clients for one account; made up front because boto3 sessions are not thread-safe (clients are)."""

    def __init__(self, endpoint, stage, account, region):
        self.stage, self.id, self.region = stage, account, region
        self.hub = account == HUB_ACCOUNT
        session = session_for(endpoint, account, region)
        make = lambda service: session.client(service, endpoint_url=endpoint, config=CLIENT_CONFIG)  # noqa: E731
        self.ec2 = make("ec2")
        self.sqs = make("sqs")
        self.events = make("events")
        self.ssm = make("ssm")
        self.autoscaling = make("autoscaling")
        self.cloudformation = make("cloudformation")
        self.logs = make("logs")


# ---------------------------------------------------------------------------------------------
# Golden AMIs (hub)


def build_amis(hub, spokes):
    """Bake the golden AMIs in the hub, as the monthly build would, and share the published ones."""
    ec2 = hub.ec2
    subnet = default_subnets(ec2)[0]

    def base_image(name_glob):
        images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": [name_glob]}])["Images"]
        if not images:
            raise RuntimeError(f"no base image matching {name_glob!r} among the emulator's default AMIs")
        return sorted(images, key=lambda i: i["Name"])[-1]["ImageId"]

    builders = {
        "al2023": base_image("amzn2-ami-hvm-*"),
        "win2022": base_image("Windows_Server-2016-English-Full-Base-*"),
    }
    instance_for = {}
    for family, image in builders.items():
        reservation = ec2.run_instances(
            ImageId=image, MinCount=1, MaxCount=1, InstanceType=INSTANCE_TYPE, SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": f"golden-builder-{family}"}]}],
        )
        instance_for[family] = reservation["Instances"][0]["InstanceId"]

    def bake(name, family, created):
        image_id = ec2.create_image(
            InstanceId=instance_for[family], Name=name, Description=f"amiflow golden image {name}",
            TagSpecifications=[{"ResourceType": "image", "Tags": [
                {"Key": "Name", "Value": name},
                {"Key": "amiflow:family", "Value": family},
                {"Key": CREATION_DATE_TAG, "Value": created},
            ]}],
        )["ImageId"]
        return image_id

    history = [bake(*spec) for spec in AL2023_HISTORY]
    candidate = bake(*AL2023_CANDIDATE)
    other = bake(*WIN2022_CURRENT)
    ec2.terminate_instances(InstanceIds=list(instance_for.values()))

    targets = [s.id for s in spokes]
    for image_id in history + [other]:
        share_ami(ec2, image_id, targets)
    return {"history": history, "current": history[-1], "candidate": candidate, "other_family": other}


def share_ami(ec2, image_id, accounts):
    """Launch permission on the AMI and createVolumePermission on its snapshots (what share-worker does)."""
    ec2.modify_image_attribute(
        ImageId=image_id, LaunchPermission={"Add": [{"UserId": a} for a in accounts]},
    )
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    for mapping in image.get("BlockDeviceMappings", []):
        snapshot = mapping.get("Ebs", {}).get("SnapshotId")
        if snapshot:
            ec2.modify_snapshot_attribute(
                SnapshotId=snapshot, Attribute="createVolumePermission",
                CreateVolumePermission={"Add": [{"UserId": a} for a in accounts]},
            )


def default_subnets(ec2):
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise RuntimeError("the account has no default VPC")
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]}])["Subnets"]
    return [s["SubnetId"] for s in sorted(subnets, key=lambda s: s["AvailabilityZone"])]


# ---------------------------------------------------------------------------------------------
# Messaging: bus, queues, rules


def provision_messaging(acct, all_accounts):
    """The account's amiflow bus, worker queues with DLQs, and routing rules (DESIGN 2)."""
    events = acct.events
    arn = events.create_event_bus(Name=BUS_NAME)["EventBusArn"]
    for other in all_accounts:
        if other != acct.id:
            events.put_permission(
                EventBusName=BUS_NAME, Action="events:PutEvents", Principal=other, StatementId=f"amiflow-{other}",
            )
    queues = {w: create_worker_queue(acct, w) for w in workers_for(acct.id)}
    if acct.hub:
        acct.logs.create_log_group(logGroupName=AUDIT_LOG_GROUP)
    for rule in rules_for(acct, queues):
        put_rule(events, **rule)
    return arn, queues


def create_worker_queue(acct, worker):
    sqs = acct.sqs
    dlq_url = sqs.create_queue(
        QueueName=f"amiflow-{worker}-dlq", Attributes={"MessageRetentionPeriod": str(14 * 24 * 3600)},
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    name = f"amiflow-{worker}"
    queue_arn = f"arn:aws:sqs:{acct.region}:{acct.id}:{name}"
    policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "AllowEventBridge",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"StringEquals": {"aws:SourceAccount": acct.id}},
        }],
    }
    url = sqs.create_queue(QueueName=name, Attributes={
        "VisibilityTimeout": str(VISIBILITY_TIMEOUT),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT}),
        "Policy": json.dumps(policy),
    })["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return {"url": url, "arn": arn, "dlq_url": dlq_url, "dlq_arn": dlq_arn}


def ours(detail_types, **detail):
    pattern = {"source": ["amiflow"], "detail-type": list(detail_types)}
    if detail:
        pattern["detail"] = {k: [v] for k, v in detail.items()}
    return pattern


def rules_for(acct, queues):
    me, region = acct.id, acct.region
    q = lambda worker: queues[worker]["arn"]  # noqa: E731
    rules = [
        dict(name="amiflow-param", bus=BUS_NAME, target=q("param"),
             pattern=ours(["AmiShared"], target_account=me)),
        # A recall (amictl recall, on the hub's bus) reaches every stage's param-worker, which
        # moves its golden parameter back; the worker judges the hub's record, not the event.
        dict(name="amiflow-param-recall", bus=BUS_NAME, target=q("param"),
             pattern=ours(["AmiRecalled"])),
        dict(name="amiflow-plan", bus=BUS_NAME, target=q("plan"),
             pattern=ours(["ParamUpdated", "RolloutWindowOpened"], account=me)),
        dict(name="amiflow-refresh", bus=BUS_NAME, target=q("refresh"),
             pattern=ours(["AsgRefreshRequested"], account=me)),
        dict(name="amiflow-refresh-outcomes", bus="default", target=q("refresh"),
             pattern={"source": ["aws.autoscaling"],
                      "detail-type": [{"prefix": "EC2 Auto Scaling Instance Refresh"}]}),
    ]
    if acct.hub:
        rules += [
            dict(name="amiflow-ingest-ec2", bus="default", target=q("ingest"),
                 pattern={"source": ["aws.ec2"], "detail-type": ["EC2 AMI State Change"]}),
            dict(name="amiflow-ingest-imagebuilder", bus="default", target=q("ingest"),
                 pattern={"source": ["aws.imagebuilder"], "detail-type": ["EC2 Image Builder Image State Change"]}),
            # The share-worker is the promotion gate: every stage's window opening re-judges the
            # gate of that stage (a spoke forwards its windows here).
            dict(name="amiflow-share", bus=BUS_NAME, target=q("share"),
                 pattern=ours(["AmiBuilt", "RolloutWindowOpened"])),
            dict(name="amiflow-audit", bus=BUS_NAME, target=q("audit"),
                 pattern=ours(["ParamUpdated", "AsgRefreshFinished"])),
            dict(name="amiflow-audit-log", bus=BUS_NAME,
                 target=f"arn:aws:logs:{region}:{me}:log-group:{AUDIT_LOG_GROUP}",
                 pattern=ours(AUDIT_DETAIL_TYPES)),
        ]
        # Bus to bus, not straight into the spoke's queue: a cross-account SQS target is not how
        # AWS is meant to be wired, and in moto it fails the whole PutEvents.
        for stage, account in STAGES:
            if account != me:
                rules.append(dict(name=f"amiflow-forward-{stage}", bus=BUS_NAME, target=bus_arn(account, region),
                                  pattern=ours(["AmiShared"], target_account=account)))
                rules.append(dict(name=f"amiflow-forward-recall-{stage}", bus=BUS_NAME,
                                  target=bus_arn(account, region), pattern=ours(["AmiRecalled"])))
    else:
        rules.append(dict(name="amiflow-forward-hub", bus=BUS_NAME, target=bus_arn(HUB_ACCOUNT, region),
                          pattern=ours(["ParamUpdated", "AsgRefreshFinished", "RolloutWindowOpened"])))
    return rules


def put_rule(events, name, bus, target, pattern):
    events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps(pattern), State="ENABLED")
    target_id = "bus" if ":event-bus/" in target else "log" if ":log-group:" in target else "queue"
    events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": target_id, "Arn": target}])


# ---------------------------------------------------------------------------------------------
# Golden parameters


def provision_parameters(acct, amis):
    # Three versions, oldest first, so the parameter's history lists the earlier golden AMIs.
    for image_id in amis["history"]:
        acct.ssm.put_parameter(
            Name=AL2023_PARAMETER, Value=image_id, Type="String", DataType="aws:ec2:image", Overwrite=True,
            Description="Current golden Amazon Linux 2023 AMI",
        )
    acct.ssm.put_parameter(
        Name=WIN2022_PARAMETER, Value=amis["other_family"], Type="String", DataType="aws:ec2:image",
        Overwrite=True, Description="Current golden Windows Server 2022 AMI",
    )


# ---------------------------------------------------------------------------------------------
# Auto Scaling groups


def plan_groups(stage, scale):
    """[(name, kind, instances, ami_key)] for one stage; ami_key indexes history ('08'...), or 'win'."""
    conf = SCALES[scale]
    specials = SPECIAL_KINDS + (UAT_ONLY_KINDS if stage == "uat" else [])
    apps = itertools.cycle(APPS)
    groups = []
    used = set()

    def name_for(kind):
        base = f"{stage}-{next(apps)}-{kind}"
        name, n = base, 2
        while name in used:
            name, n = f"{base}-{n:02d}", n + 1
        used.add(name)
        return name

    if conf["targets"] is None:
        for kind in REFRESHABLE_KINDS + specials + OVERRIDE_KINDS:
            groups.append((name_for(kind), kind, conf["group_size"], default_ami_key(kind, 0)))
        return groups

    size = conf["group_size"]
    for kind in specials:
        groups.append((name_for(kind), kind, size, default_ami_key(kind, 0)))
    target = conf["targets"][stage]
    total = sum(g[2] for g in groups)
    sizes = itertools.cycle(SEED_SIZES)
    for i in itertools.count():
        if total >= target:
            break
        kind = REFRESHABLE_KINDS[i % len(REFRESHABLE_KINDS)]
        n = min(next(sizes), target - total)
        groups.append((name_for(kind), kind, n, default_ami_key(kind, i // len(REFRESHABLE_KINDS))))
        total += n
    return groups


def default_ami_key(kind, index):
    if kind == "other-family":
        return "win"
    if kind == "latest":
        # $Latest: a group that missed last month's rollout; now and then one that missed two.
        return "08" if index % 5 == 4 else "09"
    if kind in ("launch-config", "skip-tag"):
        return "09"
    # Most groups run last month's golden AMI; every seventh of a kind is a month behind.
    return "09" if index % 7 == 6 else "10"


def provision_groups(acct, amis, scale):
    # One after the other within an account: moto has no per-request lock, and two concurrent
    # launches in one account race on a subnet's IP generator ("generator already executing", a 500).
    subnets = default_subnets(acct.ec2)
    by_key = {"08": amis["history"][0], "09": amis["history"][1], "10": amis["history"][2],
              "win": amis["other_family"]}
    plans = plan_groups(acct.stage, scale)

    def one(index, plan):
        name, kind, instances, key = plan
        ami = by_key[key]
        builder = CFN_KINDS.get(kind) or create_group
        # Three AZs per group, starting at a different one each time (moto launches into the first).
        spread = [subnets[(index + k) % len(subnets)] for k in range(min(3, len(subnets)))]
        lt_id, overrides = builder(acct, name, kind, instances, ami, by_key, spread)
        expected, strategy, reason = EXPECTATIONS[kind]
        return {"name": name, "kind": kind, "instances": instances, "ami_id": ami,
                "launch_template_id": lt_id, "overrides": overrides,
                "expected": expected, "strategy": strategy, "reason": reason}

    return [one(i, plan) for i, plan in enumerate(plans)]


def older(ami, by_key):
    """The golden AMI published the month before `ami` (itself for the oldest)."""
    order = [by_key["08"], by_key["09"], by_key["10"]]
    return order[max(order.index(ami) - 1, 0)] if ami in order else ami


def lt_data(image_id, instance_type=INSTANCE_TYPE, name=None):
    data = {"ImageId": image_id, "InstanceType": instance_type}
    if name:
        data["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}]
    return data


def launch_template(ec2, name, versions):
    """A launch template whose versions carry `versions` (full data each: see EMULATOR.md on SourceVersion)."""
    lt_id = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=versions[0])["LaunchTemplate"]["LaunchTemplateId"]
    for data in versions[1:]:
        ec2.create_launch_template_version(LaunchTemplateId=lt_id, LaunchTemplateData=data)
    return lt_id


def create_group(acct, name, kind, instances, ami, by_key, subnets):
    """Create the group; (its launch template id, its overrides with a template of their own: what
    each holds and what a rollout must do to it)."""
    ec2, asg = acct.ec2, acct.autoscaling
    overrides = []
    tags = [{"Key": "env", "Value": acct.stage}, {"Key": "app", "Value": name.split("-")[1]},
            {"Key": "Name", "Value": name}]
    args = dict(
        AutoScalingGroupName=name, MinSize=0, MaxSize=max(instances * 2, 2), DesiredCapacity=instances,
        VPCZoneIdentifier=",".join(subnets),
    )
    lt_id = None
    if kind in ("pinned", "refresh-fail", "skip-tag", "other-family"):
        # Pinned to a version number: the previous month in version 1, the running AMI in version 2.
        lt_id = launch_template(ec2, name, [lt_data(older(ami, by_key), name=name), lt_data(ami, name=name)])
        args["LaunchTemplate"] = {"LaunchTemplateId": lt_id, "Version": "2"}
        if kind == "skip-tag":
            tags.append({"Key": SKIP_TAG, "Value": "true"})
        if kind == "refresh-fail":
            tags.append({"Key": REFRESH_OUTCOME_TAG, "Value": "fail"})
    elif kind == "latest":
        lt_id = launch_template(ec2, name, [lt_data(older(ami, by_key), name=name), lt_data(ami, name=name)])
        args["LaunchTemplate"] = {"LaunchTemplateId": lt_id, "Version": "$Latest"}
    elif kind == "default":
        # Version 3 is an unpromoted draft on an older AMI: $Default (2) and $Latest (3) differ.
        lt_id = launch_template(ec2, name, [
            lt_data(older(ami, by_key), name=name), lt_data(ami, name=name),
            lt_data(older(ami, by_key), "t3.small", name=name),
        ])
        ec2.modify_launch_template(LaunchTemplateId=lt_id, DefaultVersion="2")
        args["LaunchTemplate"] = {"LaunchTemplateId": lt_id, "Version": "$Default"}
    elif kind == "mixed":
        lt_id = launch_template(ec2, name, [lt_data(ami, name=name)])
        args["MixedInstancesPolicy"] = {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateId": lt_id, "Version": "1"},
                "Overrides": [{"InstanceType": "t3.micro"}, {"InstanceType": "t3a.micro"}],
            },
            # One on-demand instance, Spot above it. Not a 50/50 split: moto 5.2.5 truncates both
            # shares of an odd remainder and launches one instance short of the desired capacity.
            "InstancesDistribution": {
                "OnDemandBaseCapacity": 1, "OnDemandPercentageAboveBaseCapacity": 0,
                "SpotAllocationStrategy": "price-capacity-optimized",
            },
        }
    elif kind in OVERRIDE_KINDS:
        lt_id = launch_template(ec2, name, [lt_data(ami, name=name)])
        over_ami = ami if kind == "override-old" else by_key["win"]
        over_id = launch_template(ec2, f"{name}-t3small", [lt_data(over_ami, "t3.small", name=name)])
        own = {"InstanceType": "t3.small",
               "LaunchTemplateSpecification": {"LaunchTemplateId": over_id, "Version": "1"}}
        plain = {"InstanceType": "t3.micro"}
        args["MixedInstancesPolicy"] = {"LaunchTemplate": {
            "LaunchTemplateSpecification": {"LaunchTemplateId": lt_id, "Version": "1"},
            "Overrides": [own, plain] if kind == "override-old" else [plain, own],
        }}
        overrides.append({"instance_type": "t3.small", "launch_template_id": over_id, "ami_id": over_ami,
                          "expected": "moved" if kind == "override-old" else "left-alone"})
    elif kind == "ssm-resolve":
        lt_id = launch_template(ec2, name, [lt_data(f"resolve:ssm:{AL2023_PARAMETER}", name=name)])
        args["LaunchTemplate"] = {"LaunchTemplateId": lt_id, "Version": "$Default"}
    elif kind == "launch-config":
        asg.create_launch_configuration(LaunchConfigurationName=name, ImageId=ami, InstanceType=INSTANCE_TYPE)
        args["LaunchConfigurationName"] = name
    else:
        raise ValueError(f"unknown group kind {kind!r}")
    args["Tags"] = [dict(t, ResourceId=name, ResourceType="auto-scaling-group", PropagateAtLaunch=True) for t in tags]
    asg.create_auto_scaling_group(**args)
    return lt_id, overrides


# CloudFormation-owned groups. Both stacks create the launch template and the group; they differ
# only in how the AMI gets into the template, which is what decides the refresh-worker's strategy.
def cfn_template(image_parameter):
    params = {
        "Subnets": {"Type": "List<AWS::EC2::Subnet::Id>"},
        "Capacity": {"Type": "Number", "Default": "2"},
        "GroupName": {"Type": "String"},
    }
    if image_parameter:
        params["ImageId"] = {"Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>", "Default": AL2023_PARAMETER}
        image = {"Ref": "ImageId"}
    else:
        image = "{{resolve:ssm:%s}}" % AL2023_PARAMETER
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "An application group owned by CloudFormation (amiflow local world)",
        "Parameters": params,
        "Resources": {
            "LaunchTemplate": {
                "Type": "AWS::EC2::LaunchTemplate",
                "Properties": {
                    "LaunchTemplateName": {"Ref": "GroupName"},
                    "LaunchTemplateData": {"ImageId": image, "InstanceType": INSTANCE_TYPE},
                },
            },
            "Group": {
                "Type": "AWS::AutoScaling::AutoScalingGroup",
                "Properties": {
                    "AutoScalingGroupName": {"Ref": "GroupName"},
                    "LaunchTemplate": {
                        "LaunchTemplateId": {"Ref": "LaunchTemplate"},
                        "Version": {"Fn::GetAtt": ["LaunchTemplate", "LatestVersionNumber"]},
                    },
                    "MinSize": "0",
                    "MaxSize": "10",
                    "DesiredCapacity": {"Ref": "Capacity"},
                    "VPCZoneIdentifier": {"Ref": "Subnets"},
                },
            },
        },
    }


def create_cfn_group(acct, name, kind, instances, ami, by_key, subnets):
    cfn = acct.cloudformation
    cfn.create_stack(
        StackName=name,
        TemplateBody=json.dumps(cfn_template(image_parameter=(kind == "cfn-param"))),
        Parameters=[
            {"ParameterKey": "Subnets", "ParameterValue": ",".join(subnets)},
            {"ParameterKey": "Capacity", "ParameterValue": str(instances)},
            {"ParameterKey": "GroupName", "ParameterValue": name},
        ],
        Tags=[{"Key": "env", "Value": acct.stage}],
    )
    deadline = time.monotonic() + 60
    while True:
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        status = stack["StackStatus"]
        if status == "CREATE_COMPLETE":
            break
        if not status.endswith("_IN_PROGRESS") or time.monotonic() > deadline:
            reasons = [e.get("ResourceStatusReason") for e in cfn.describe_stack_events(StackName=name)["StackEvents"]
                       if e.get("ResourceStatusReason")]
            raise RuntimeError(f"stack {name} ended in {status}: {reasons[:3]}")
        time.sleep(0.1)
    resource = cfn.describe_stack_resource(StackName=name, LogicalResourceId="LaunchTemplate")
    return resource["StackResourceDetail"]["PhysicalResourceId"], []


CFN_KINDS = {"cfn-param": create_cfn_group, "cfn-resolve": create_cfn_group}


# ---------------------------------------------------------------------------------------------
# The whole world


def ensure_empty(hub):
    """A world is built once per emulator: fail fast, before creating anything, if one is there."""
    try:
        hub.events.describe_event_bus(Name=BUS_NAME)
    except ClientError as err:
        if err.response["Error"]["Code"] == "ResourceNotFoundException":
            return
        raise
    raise RuntimeError("the emulator already holds an amiflow world; start a fresh one or POST /moto-api/reset")


def provision(endpoint, scale="small", region="us-east-1", messaging=True):
    """Build the world in the moto server at `endpoint` and return its state (see module doc)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, not {scale!r}")
    started = time.monotonic()
    accounts = [Account(endpoint, stage, account, region) for stage, account in STAGES]
    hub = next(a for a in accounts if a.hub)
    all_ids = [a.id for a in accounts]
    ensure_empty(hub)
    timings = {}
    amis_box = {}
    amis_ready = threading.Event()

    def amis_job():
        t = time.monotonic()
        try:
            amis_box["amis"] = build_amis(hub, [a for a in accounts if not a.hub])
        finally:
            timings["amis_seconds"] = round(time.monotonic() - t, 2)
            amis_ready.set()

    def account_job(acct):
        t = time.monotonic()
        arn, queues = provision_messaging(acct, all_ids) if messaging else (None, {})
        amis_ready.wait()
        if "amis" not in amis_box:
            raise RuntimeError("building the golden AMIs failed")
        provision_parameters(acct, amis_box["amis"])
        groups = provision_groups(acct, amis_box["amis"], scale)
        timings[f"{acct.stage}_seconds"] = round(time.monotonic() - t, 2)
        return {"stage": acct.stage, "hub": acct.hub, "bus_name": BUS_NAME, "bus_arn": arn,
                "queues": queues, "groups": groups}

    with ThreadPoolExecutor(max_workers=len(accounts) + 1, thread_name_prefix="world") as pool:
        amis_future = pool.submit(amis_job)
        futures = {a.id: pool.submit(account_job, a) for a in accounts}
        amis_future.result()
        account_states = {acct: f.result() for acct, f in futures.items()}

    timings["provision_seconds"] = round(time.monotonic() - started, 2)
    return {
        "endpoint": endpoint,
        "region": region,
        "role_name": ROLE_NAME,
        "hub_account": HUB_ACCOUNT,
        "accounts": account_states,
        "families": FAMILIES,
        "amis": amis_box["amis"],
        "scale": scale,
        "timings": timings,
    }


def main(argv=None):
    global VISIBILITY_TIMEOUT
    parser = argparse.ArgumentParser(description="amiflow's local world in a moto server")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provision", help="build the world and write its state file")
    p.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                   help="moto server URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--out", required=True, help="where to write the state JSON")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--no-messaging", action="store_true",
                   help="no buses, queues or rules (the deploy templates create them)")
    p.add_argument("--visibility-timeout", type=int, default=VISIBILITY_TIMEOUT, metavar="SECONDS",
                   help=f"worker queues' visibility timeout (default {VISIBILITY_TIMEOUT}): how soon a "
                        "killed worker's in-flight messages return to its queue")
    args = parser.parse_args(argv)
    if not 1 <= args.visibility_timeout <= 43200:
        parser.error("--visibility-timeout must be 1 to 43200 seconds (SQS's range)")
    VISIBILITY_TIMEOUT = args.visibility_timeout
    if not args.endpoint:
        parser.error("--endpoint is required (or set AWS_ENDPOINT_URL)")

    try:
        state = provision(args.endpoint, args.scale, args.region, messaging=not args.no_messaging)
    except (ClientError, BotoCoreError, RuntimeError) as err:
        print(f"provisioning failed: {err}", file=sys.stderr)
        return 1
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)
    groups = sum(len(a["groups"]) for a in state["accounts"].values())
    instances = sum(g["instances"] for a in state["accounts"].values() for g in a["groups"])
    print(json.dumps({"event": "provisioned", "scale": args.scale, "groups": groups, "instances": instances,
                      "seconds": state["timings"]["provision_seconds"], "out": args.out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
