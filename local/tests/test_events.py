"""boto3 checks of amiflow_shim.events: ``account`` in SQS deliveries, envelope kept across buses."""

import json
import random
import time

import pytest

REGION = "us-east-1"


def new_account():
    return str(random.randint(10**11, 10**12 - 1))


def receive_one(sqs, url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=1).get("Messages", [])
        if msgs:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msgs[0]["ReceiptHandle"])
            return json.loads(msgs[0]["Body"])
    raise AssertionError("no message before the deadline")


def queue_with_rule(session, endpoint, bus, rule, pattern):
    sqs = session.client("sqs", endpoint_url=endpoint)
    events = session.client("events", endpoint_url=endpoint)
    url = sqs.create_queue(QueueName=f"{rule}-q")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name=rule, EventBusName=bus, EventPattern=json.dumps(pattern))
    events.put_targets(Rule=rule, EventBusName=bus, Targets=[{"Id": "q", "Arn": arn}])
    return sqs, url


def test_sqs_target_gets_account(session_for, endpoint):
    account = new_account()
    session = session_for(account)
    sqs, url = queue_with_rule(session, endpoint, "default", "to-queue", {"source": ["amiflow"]})
    detail = {"schema_version": 1, "rollout_id": "/golden/al2023@ami-0123456789abcdef0", "key": "built:ami-1"}
    session.client("events", endpoint_url=endpoint).put_events(Entries=[{
        "Source": "amiflow", "DetailType": "AmiBuilt", "Detail": json.dumps(detail), "Resources": ["arn:x"],
    }])
    body = receive_one(sqs, url)
    assert body["account"] == account
    assert body["region"] == REGION
    assert body["detail-type"] == "AmiBuilt" and body["source"] == "amiflow"
    assert body["detail"] == detail
    assert body["resources"] == ["arn:x"]
    assert {"version", "id", "time"} <= set(body)


def test_forwarded_event_keeps_original_account(session_for, endpoint):
    hub, spoke = new_account(), new_account()
    hub_s, spoke_s = session_for(hub), session_for(spoke)
    hub_events = hub_s.client("events", endpoint_url=endpoint)
    spoke_events = spoke_s.client("events", endpoint_url=endpoint)

    spoke_bus = spoke_events.create_event_bus(Name="amiflow")["EventBusArn"]
    spoke_events.put_permission(EventBusName="amiflow", Action="events:PutEvents", Principal=hub, StatementId="hub")
    sqs, url = queue_with_rule(spoke_s, endpoint, "amiflow", "spoke-in",
                               {"source": ["amiflow"], "account": [hub]})

    hub_events.create_event_bus(Name="amiflow")
    hub_events.put_rule(Name="to-spoke", EventBusName="amiflow",
                        EventPattern=json.dumps({"source": ["amiflow"], "detail-type": ["AmiShared"]}))
    hub_events.put_targets(Rule="to-spoke", EventBusName="amiflow", Targets=[{"Id": "spoke", "Arn": spoke_bus}])

    detail = {"schema_version": 1, "ami_id": "ami-0123456789abcdef0", "target_account": spoke,
              "nested": {"list": [1, 2, 3], "flag": True}}
    sent = hub_events.put_events(Entries=[{
        "Source": "amiflow", "DetailType": "AmiShared", "Detail": json.dumps(detail),
        "EventBusName": "amiflow", "Resources": ["arn:aws:ec2:us-east-1::image/ami-0123456789abcdef0"],
    }])
    assert sent["FailedEntryCount"] == 0
    body = receive_one(sqs, url)
    # The spoke's rule matched on account = hub, so the envelope survived the hop.
    assert body["account"] == hub
    assert body["detail"] == detail
    assert body["detail-type"] == "AmiShared" and body["source"] == "amiflow"
    assert body["resources"] == ["arn:aws:ec2:us-east-1::image/ami-0123456789abcdef0"]
    assert body["id"] == sent["Entries"][0]["EventId"]

    # An event put directly on the spoke bus still carries the spoke's own account.
    sqs2, url2 = queue_with_rule(spoke_s, endpoint, "amiflow", "spoke-local", {"source": ["local"]})
    spoke_events.put_events(Entries=[{"Source": "local", "DetailType": "X", "Detail": "{}", "EventBusName": "amiflow"}])
    assert receive_one(sqs2, url2)["account"] == spoke
