"""boto3 checks of amiflow_shim.ec2 against the launcher: shared AMIs, snapshot permissions,
creation-date hook, launch template versions."""

import base64
import random
import time
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

CREATION_DATE_TAG = "amiflow:emulator-creation-date"


def new_account():
    return str(random.randint(10**11, 10**12 - 1))


def register(ec2, name, tags=None):
    spec = [{"ResourceType": "image", "Tags": tags}] if tags else []
    return ec2.register_image(Name=name, TagSpecifications=spec)["ImageId"]


def wait_for(predicate, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)


class _Account:
    """boto3 clients acting in one account, pointed at the launcher."""

    def __init__(self, session, endpoint):
        self.session, self.endpoint = session, endpoint

    def client(self, service):
        return self.session.client(service, endpoint_url=self.endpoint)


@pytest.fixture
def accounts(session_for, endpoint):
    a, b, c = new_account(), new_account(), new_account()
    return {name: _Account(session_for(acct), endpoint) for name, acct in (("a", a), ("b", b), ("c", c))}, (a, b, c)


def test_ami_shared_with_account_is_visible_and_launchable(accounts):
    sessions, (a, b, c) = accounts
    ec2_a, ec2_b, ec2_c = (sessions[k].client("ec2") for k in "abc")
    ami = register(ec2_a, "golden-shared")
    assert ec2_a.describe_images(ImageIds=[ami])["Images"][0]["OwnerId"] == a
    # Not shared yet: B cannot see it.
    with pytest.raises(ClientError) as err:
        ec2_b.describe_images(ImageIds=[ami])
    assert err.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"
    ec2_a.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"UserId": b}]})

    # B sees it by id, as an executable image, and by owner.
    images = ec2_b.describe_images(ImageIds=[ami])["Images"]
    assert [(i["ImageId"], i["OwnerId"]) for i in images] == [(ami, a)]
    assert ami in [i["ImageId"] for i in ec2_b.describe_images(ExecutableUsers=["self"])["Images"]]
    assert [i["ImageId"] for i in ec2_b.describe_images(Owners=[a])["Images"]] == [ami]

    # B launches it.
    reservation = ec2_b.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    instance_id = reservation["Instances"][0]["InstanceId"]
    described = ec2_b.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert (described["ImageId"], described["State"]["Name"]) == (ami, "running")

    # C was not granted anything.
    with pytest.raises(ClientError) as err:
        ec2_c.describe_images(ImageIds=[ami])
    assert err.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"
    assert ami not in [i["ImageId"] for i in ec2_c.describe_images(ExecutableUsers=["self"])["Images"]]
    with pytest.raises(ClientError):
        ec2_c.run_instances(ImageId=ami, MinCount=1, MaxCount=1)

    # Only the owner may change (or read) its launch permissions.
    with pytest.raises(ClientError) as err:
        ec2_b.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"UserId": c}]})
    assert err.value.response["Error"]["Code"] == "AuthFailure"

    # Revoking hides it again.
    ec2_a.modify_image_attribute(ImageId=ami, LaunchPermission={"Remove": [{"UserId": b}]})
    with pytest.raises(ClientError):
        ec2_b.describe_images(ImageIds=[ami])


def test_public_ami_and_autoscaling_launch_in_other_account(accounts):
    sessions, (a, b, c) = accounts
    ec2_a, ec2_c = sessions["a"].client("ec2"), sessions["c"].client("ec2")
    ami = register(ec2_a, "golden-public")
    ec2_a.modify_image_attribute(ImageId=ami, OperationType="add", UserGroups=["all"])
    assert ec2_c.describe_images(ImageIds=[ami])["Images"][0]["ImageId"] == ami

    lt = ec2_c.create_launch_template(
        LaunchTemplateName="asg-lt", LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    asg = sessions["c"].client("autoscaling")
    asg.create_auto_scaling_group(
        AutoScalingGroupName="shared-ami-group",
        LaunchTemplate={"LaunchTemplateId": lt, "Version": "1"},
        MinSize=1, MaxSize=2, DesiredCapacity=2, AvailabilityZones=["us-east-1a"],
    )
    group = wait_for(lambda: [
        g for g in asg.describe_auto_scaling_groups(AutoScalingGroupNames=["shared-ami-group"])["AutoScalingGroups"]
        if len(g["Instances"]) == 2
    ])[0]
    ids = [i["InstanceId"] for i in group["Instances"]]
    reservations = ec2_c.describe_instances(InstanceIds=ids)["Reservations"]
    assert {i["ImageId"] for r in reservations for i in r["Instances"]} == {ami}


def test_snapshot_create_volume_permission_round_trip(accounts):
    sessions, (a, b, c) = accounts
    ec2_a = sessions["a"].client("ec2")
    ami = register(ec2_a, "golden-snap")
    image = ec2_a.describe_images(ImageIds=[ami])["Images"][0]
    snap = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]

    ec2_a.modify_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission",
                                    CreateVolumePermission={"Add": [{"UserId": b}]})
    ec2_a.modify_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission",
                                    OperationType="add", UserIds=[c])
    perms = ec2_a.describe_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission")
    assert sorted(p["UserId"] for p in perms["CreateVolumePermissions"]) == sorted([b, c])

    ec2_a.modify_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission",
                                    CreateVolumePermission={"Remove": [{"UserId": c}]})
    perms = ec2_a.describe_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission")
    assert [p["UserId"] for p in perms["CreateVolumePermissions"]] == [b]


def test_creation_date_hook_on_register_and_create_image(accounts):
    sessions, _ = accounts
    ec2 = sessions["a"].client("ec2")
    ami = register(ec2, "golden-2025-01", tags=[{"Key": CREATION_DATE_TAG, "Value": "2025-01-15T10:00:00Z"},
                                                 {"Key": "family", "Value": "al2023"}])
    image = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert image["CreationDate"].startswith("2025-01-15T10:00:00")
    assert {"Key": "family", "Value": "al2023"} in image["Tags"]

    base = register(ec2, "base")
    instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    created = ec2.create_image(
        InstanceId=instance, Name="golden-2025-02",
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": CREATION_DATE_TAG, "Value": "2025-02-15T10:00:00+00:00"}]},
                           {"ResourceType": "snapshot", "Tags": [{"Key": "family", "Value": "al2023"}]}],
    )["ImageId"]
    image = ec2.describe_images(ImageIds=[created])["Images"][0]
    assert image["CreationDate"].startswith("2025-02-15T10:00:00")
    snap = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snap_tags = ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0].get("Tags", [])
    assert {"Key": "family", "Value": "al2023"} in snap_tags

    # Without the hook, the image is created now.
    plain = ec2.describe_images(ImageIds=[base])["Images"][0]["CreationDate"]
    assert plain[:4] == str(datetime.now(timezone.utc).year)

    with pytest.raises(ClientError) as err:
        register(ec2, "bad-date", tags=[{"Key": CREATION_DATE_TAG, "Value": "last tuesday"}])
    assert err.value.response["Error"]["Code"] == "InvalidParameterValue"


def test_image_deprecation_is_set_by_its_owner_only_and_shown_by_describe_images(accounts):
    sessions, (a, b, _) = accounts
    ec2_a, ec2_b = sessions["a"].client("ec2"), sessions["b"].client("ec2")
    ami = register(ec2_a, "golden-to-deprecate")
    assert "DeprecationTime" not in ec2_a.describe_images(ImageIds=[ami])["Images"][0]
    ec2_a.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"UserId": b}]})
    with pytest.raises(ClientError) as err:
        ec2_b.enable_image_deprecation(ImageId=ami, DeprecateAt=datetime(2099, 1, 1, tzinfo=timezone.utc))
    assert err.value.response["Error"]["Code"] == "AuthFailure"
    with pytest.raises(ClientError) as err:
        ec2_a.enable_image_deprecation(ImageId=ami, DeprecateAt=datetime(2020, 1, 1, tzinfo=timezone.utc))
    assert err.value.response["Error"]["Code"] == "InvalidParameterValue"
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=5, seconds=7)
    assert ec2_a.enable_image_deprecation(ImageId=ami, DeprecateAt=soon)["Return"] is True
    shown = ec2_a.describe_images(ImageIds=[ami])["Images"][0]["DeprecationTime"]
    rounded = soon.replace(second=0) + timedelta(minutes=1)
    assert shown == rounded.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    # Still launchable by its id.
    ec2_a.run_instances(ImageId=ami, MinCount=1, MaxCount=1)


def _lt_with_versions(ec2, name, count, images):
    user_data = base64.b64encode(b"#!/bin/sh\necho hi\n").decode()
    lt = ec2.create_launch_template(
        LaunchTemplateName=name,
        LaunchTemplateData={
            "ImageId": images[0], "InstanceType": "t3.small", "KeyName": "ops",
            "UserData": user_data,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "app", "Value": "web"}]}],
        },
    )["LaunchTemplate"]["LaunchTemplateId"]
    for n in range(2, count + 1):
        ec2.create_launch_template_version(
            LaunchTemplateId=lt, SourceVersion=str(n - 1),
            LaunchTemplateData={"ImageId": images[n % len(images)]},
        )
    return lt, user_data


def test_launch_template_version_client_token_makes_a_retry_return_the_first_version(accounts):
    sessions, _ = accounts
    ec2 = sessions["a"].client("ec2")
    ami1, ami2 = register(ec2, "img-tok-one"), register(ec2, "img-tok-two")
    lt, _ = _lt_with_versions(ec2, "tokens", 1, [ami1])

    def create(token, image=ami2):
        return ec2.create_launch_template_version(
            LaunchTemplateId=lt, SourceVersion="1", VersionDescription="amiflow", ClientToken=token,
            LaunchTemplateData={"ImageId": image},
        )["LaunchTemplateVersion"]["VersionNumber"]

    assert create("retry-1") == 2
    # The same request again (its first reply lost): the same version, none made.
    assert create("retry-1") == 2
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt)["LaunchTemplateVersions"]
    assert sorted(v["VersionNumber"] for v in versions) == [1, 2]
    # Another token is another request.
    assert create("retry-2") == 3
    # The token of another request: refused.
    with pytest.raises(ClientError) as err:
        create("retry-1", image=ami1)
    assert err.value.response["Error"]["Code"] == "IdempotentParameterMismatch"


def test_launch_template_version_inherits_from_source(accounts):
    sessions, _ = accounts
    ec2 = sessions["a"].client("ec2")
    ami1, ami2 = register(ec2, "img-one"), register(ec2, "img-two")
    lt, user_data = _lt_with_versions(ec2, "inherit", 1, [ami1])

    new = ec2.create_launch_template_version(
        LaunchTemplateId=lt, SourceVersion="1", VersionDescription="new ami",
        LaunchTemplateData={"ImageId": ami2},
    )["LaunchTemplateVersion"]
    assert new["VersionNumber"] == 2
    data = ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["2"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["ImageId"] == ami2
    assert data["InstanceType"] == "t3.small"
    assert data["KeyName"] == "ops"
    assert data["UserData"] == user_data
    assert data["TagSpecifications"][0]["Tags"] == [{"Key": "app", "Value": "web"}]
    # The source version is untouched, and everything but the override is the source's.
    v1 = ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["1"])["LaunchTemplateVersions"][0]
    assert v1["LaunchTemplateData"]["ImageId"] == ami1
    assert data == {**v1["LaunchTemplateData"], "ImageId": ami2}
    # Instances launched from version 2 get the inherited data.
    inst = ec2.run_instances(LaunchTemplate={"LaunchTemplateId": lt, "Version": "2"}, MinCount=1, MaxCount=1)["Instances"][0]
    assert (inst["ImageId"], inst["KeyName"], inst["InstanceType"]) == (ami2, "ops", "t3.small")

    # A version created with UserData (moto stored it unparsed and later launches crashed).
    other = base64.b64encode(b"#!/bin/sh\necho v3\n").decode()
    ec2.create_launch_template_version(LaunchTemplateId=lt, SourceVersion="$Latest", LaunchTemplateData={"UserData": other})
    v3 = ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["$Latest"])["LaunchTemplateVersions"][0]
    assert (v3["VersionNumber"], v3["LaunchTemplateData"]["UserData"], v3["LaunchTemplateData"]["ImageId"]) == (3, other, ami2)
    inst = ec2.run_instances(LaunchTemplate={"LaunchTemplateId": lt, "Version": "3"}, MinCount=1, MaxCount=1)["Instances"][0]
    assert inst["ImageId"] == ami2


def test_describe_tags_by_exact_ids_reads_only_those_resources_and_matches_wildcards(accounts):
    # amiflow_shim.speed looks up exact resource ids directly; a wildcard goes through moto's scan.
    sessions, _ = accounts
    ec2 = sessions["a"].client("ec2")
    ami = register(ec2, "img-tags")
    lt, _ = _lt_with_versions(ec2, "tags", 1, [ami])
    ids = [i["InstanceId"] for i in ec2.run_instances(
        LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"}, MinCount=3, MaxCount=3,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "team", "Value": "blue"}]}],
    )["Instances"]]
    keys = ["aws:ec2launchtemplate:id", "aws:ec2launchtemplate:version"]

    def tags(**filters):
        out = ec2.describe_tags(Filters=[{"Name": k, "Values": v} for k, v in filters.items()])["Tags"]
        return sorted((t["ResourceId"], t["Key"], t["Value"], t["ResourceType"]) for t in out)

    # EC2 records the version an instance was launched from as its number, whatever was asked.
    wanted = sorted((i, k, v, "instance") for i in ids[:2] for k, v in zip(keys, [lt, "1"]))
    assert tags(**{"resource-id": ids[:2], "key": keys}) == wanted
    assert tags(**{"resource-id": ids[:2] + ["i-0000000000000dead"], "key": keys}) == wanted
    assert tags(**{"resource-id": [ids[2]], "value": ["blue"]}) == [(ids[2], "team", "blue", "instance")]
    # A wildcard id takes moto's own path, with the same answer.
    prefix = ids[0][:-1] + "*"
    by_prefix = [t for t in tags(**{"resource-id": [prefix], "key": keys})]
    assert by_prefix == sorted((ids[0], k, v, "instance") for k, v in zip(keys, [lt, "1"]))
    # And every instance's own tags still come with DescribeInstances.
    described = ec2.describe_instances(InstanceIds=ids)["Reservations"][0]["Instances"]
    assert all({t["Key"]: t["Value"] for t in i["Tags"]}["aws:ec2launchtemplate:version"] == "1" for i in described)


def test_describe_versions_filters_versions_and_paging(accounts):
    sessions, _ = accounts
    ec2 = sessions["a"].client("ec2")
    ami_a, ami_b = register(ec2, "img-a"), register(ec2, "img-b")
    lt, _ = _lt_with_versions(ec2, "paged", 20, [ami_a, ami_b])

    # Every version, newest first, across pages.
    pages = list(ec2.get_paginator("describe_launch_template_versions").paginate(
        LaunchTemplateId=lt, PaginationConfig={"PageSize": 7}))
    assert [len(p["LaunchTemplateVersions"]) for p in pages] == [7, 7, 6]
    numbers = [v["VersionNumber"] for p in pages for v in p["LaunchTemplateVersions"]]
    assert numbers == list(range(20, 0, -1))
    # Without MaxResults moto used to stop at 15.
    assert len(ec2.describe_launch_template_versions(LaunchTemplateId=lt)["LaunchTemplateVersions"]) == 20

    by_image = ec2.describe_launch_template_versions(
        LaunchTemplateId=lt, Filters=[{"Name": "image-id", "Values": [ami_a]}])["LaunchTemplateVersions"]
    assert {v["LaunchTemplateData"]["ImageId"] for v in by_image} == {ami_a}
    assert len(by_image) == 11  # version 1 and every even version

    default = ec2.describe_launch_template_versions(
        LaunchTemplateId=lt, Filters=[{"Name": "is-default-version", "Values": ["true"]}])["LaunchTemplateVersions"]
    assert [v["VersionNumber"] for v in default] == [1]

    picked = ec2.describe_launch_template_versions(LaunchTemplateName="paged", Versions=["$Latest", "$Default", "3"])
    assert sorted(v["VersionNumber"] for v in picked["LaunchTemplateVersions"]) == [1, 3, 20]

    ranged = ec2.describe_launch_template_versions(LaunchTemplateId=lt, MinVersion="5", MaxVersion="8")
    assert [v["VersionNumber"] for v in ranged["LaunchTemplateVersions"]] == [8, 7, 6, 5]

    # ModifyLaunchTemplate DefaultVersion.
    ec2.modify_launch_template(LaunchTemplateId=lt, DefaultVersion="12")
    assert ec2.describe_launch_templates(LaunchTemplateIds=[lt])["LaunchTemplates"][0]["DefaultVersionNumber"] == 12
    default = ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["$Default"])["LaunchTemplateVersions"]
    assert [(v["VersionNumber"], v["DefaultVersion"]) for v in default] == [(12, True)]

    # Default-version filter combined with an image filter.
    both = ec2.describe_launch_template_versions(
        LaunchTemplateId=lt, Filters=[{"Name": "is-default-version", "Values": ["false"]},
                                      {"Name": "image-id", "Values": [ami_b]}])["LaunchTemplateVersions"]
    assert all(not v["DefaultVersion"] and v["LaunchTemplateData"]["ImageId"] == ami_b for v in both)


def test_delete_launch_template_versions(accounts):
    sessions, _ = accounts
    ec2 = sessions["a"].client("ec2")
    ami = register(ec2, "img-del")
    lt, _ = _lt_with_versions(ec2, "deletable", 4, [ami])
    result = ec2.delete_launch_template_versions(LaunchTemplateId=lt, Versions=["2", "1", "9"])
    assert [v["VersionNumber"] for v in result["SuccessfullyDeletedLaunchTemplateVersions"]] == [2]
    failed = {v["VersionNumber"]: v["ResponseError"]["Code"] for v in result["UnsuccessfullyDeletedLaunchTemplateVersions"]}
    assert failed == {1: "unexpectedError", 9: "launchTemplateVersionDoesNotExist"}
    remaining = ec2.describe_launch_template_versions(LaunchTemplateId=lt)["LaunchTemplateVersions"]
    assert [v["VersionNumber"] for v in remaining] == [4, 3, 1]
    with pytest.raises(ClientError):
        ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["2"])
    # Deleting the latest makes the previous one $Latest; numbers are not reused.
    ec2.delete_launch_template_versions(LaunchTemplateId=lt, Versions=["4"])
    assert ec2.describe_launch_templates(LaunchTemplateIds=[lt])["LaunchTemplates"][0]["LatestVersionNumber"] == 3
    new = ec2.create_launch_template_version(LaunchTemplateId=lt, SourceVersion="3", LaunchTemplateData={})
    assert new["LaunchTemplateVersion"]["VersionNumber"] == 5
