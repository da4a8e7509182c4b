"""boto3 checks of amiflow_shim.ssm: aws:ec2:image validation (format at once, visibility 'async')."""

import random

import pytest
from botocore.exceptions import ClientError

IMAGE = "aws:ec2:image"


def new_account():
    return str(random.randint(10**11, 10**12 - 1))


@pytest.fixture
def spoke(session_for, endpoint):
    hub_id, spoke_id = new_account(), new_account()
    hub, spoke = session_for(hub_id), session_for(spoke_id)
    return (hub.client("ec2", endpoint_url=endpoint), spoke.client("ec2", endpoint_url=endpoint),
            spoke.client("ssm", endpoint_url=endpoint), spoke_id)


def test_malformed_ami_value_rejected_synchronously(spoke):
    _, ec2, ssm, _ = spoke
    ami = ec2.register_image(Name="own-image")["ImageId"]
    ssm.put_parameter(Name="/golden/al2023", Value=ami, Type="String", DataType=IMAGE)
    for bad in ("not-an-ami", "ami-123", "ami-0123456789ABCDEF0", "ami-0123456789abcdef01"):
        with pytest.raises(ClientError) as err:
            ssm.put_parameter(Name="/golden/al2023", Value=bad, Type="String", DataType=IMAGE, Overwrite=True)
        assert err.value.response["Error"]["Code"] == "ValidationException"
    param = ssm.get_parameter(Name="/golden/al2023")["Parameter"]
    assert (param["Value"], param["Version"], param["DataType"]) == (ami, 1, IMAGE)
    # text parameters are not validated.
    ssm.put_parameter(Name="/free/text", Value="not-an-ami", Type="String")


def test_invisible_ami_accepted_then_discarded(spoke):
    hub_ec2, ec2, ssm, spoke_id = spoke
    current = ec2.register_image(Name="current")["ImageId"]
    ssm.put_parameter(Name="/golden/web", Value=current, Type="String", DataType=IMAGE)

    # Well-shaped but unknown, and a hub AMI not (yet) shared: PutParameter answers with a version...
    hub_ami = hub_ec2.register_image(Name="hub-golden")["ImageId"]
    for invisible in ("ami-0123456789abcdef0", hub_ami):
        answer = ssm.put_parameter(Name="/golden/web", Value=invisible, Type="String", DataType=IMAGE, Overwrite=True)
        assert answer["Version"] == 2
        # ...but reading back still gives the previous value.
        param = ssm.get_parameter(Name="/golden/web")["Parameter"]
        assert (param["Value"], param["Version"]) == (current, 1)
    history = ssm.get_parameter_history(Name="/golden/web")["Parameters"]
    assert [h["Value"] for h in history] == [current]

    # Once shared, the same value sticks.
    hub_ec2.modify_image_attribute(ImageId=hub_ami, LaunchPermission={"Add": [{"UserId": spoke_id}]})
    ssm.put_parameter(Name="/golden/web", Value=hub_ami, Type="String", DataType=IMAGE, Overwrite=True)
    param = ssm.get_parameter(Name="/golden/web")["Parameter"]
    assert (param["Value"], param["Version"], param["DataType"]) == (hub_ami, 2, IMAGE)
    assert [h["Value"] for h in ssm.get_parameter_history(Name="/golden/web")["Parameters"]] == [current, hub_ami]

    # Overwrite without DataType keeps aws:ec2:image, and so stays validated.
    ssm.put_parameter(Name="/golden/web", Value="ami-0123456789abcdef0", Type="String", Overwrite=True)
    param = ssm.get_parameter(Name="/golden/web")["Parameter"]
    assert (param["Value"], param["DataType"]) == (hub_ami, IMAGE)


def test_new_parameter_with_invisible_ami_never_appears(spoke):
    _, _, ssm, _ = spoke
    ssm.put_parameter(Name="/golden/new", Value="ami-0123456789abcdef0", Type="String", DataType=IMAGE,
                      Tags=[{"Key": "team", "Value": "x"}])
    with pytest.raises(ClientError) as err:
        ssm.get_parameter(Name="/golden/new")
    assert err.value.response["Error"]["Code"] == "ParameterNotFound"
