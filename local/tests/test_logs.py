"""boto3 checks of amiflow_shim.logs: an EventBridge rule's log-group target stores whole-millisecond
timestamps (the Rust SDK rejects moto's float ones), and a quoted-term filter finds the event."""

import json
import random
import time

REGION = "us-east-1"


def test_rule_to_log_group_has_integer_timestamps(session_for, endpoint):
    account = str(random.randint(10**11, 10**12 - 1))
    session = session_for(account)
    events = session.client("events", endpoint_url=endpoint)
    logs = session.client("logs", endpoint_url=endpoint)
    group = "/amiflow/audit"
    logs.create_log_group(logGroupName=group)
    events.create_event_bus(Name="amiflow")
    events.put_rule(Name="audit", EventBusName="amiflow", EventPattern=json.dumps({"source": ["amiflow"]}))
    events.put_targets(Rule="audit", EventBusName="amiflow", Targets=[
        {"Id": "log", "Arn": f"arn:aws:logs:{REGION}:{account}:log-group:{group}"}])
    rollout = "/golden/al2023/ami-id@ami-0123456789abcdef0"
    events.put_events(Entries=[{
        "Source": "amiflow", "DetailType": "ParamUpdated", "EventBusName": "amiflow",
        "Detail": json.dumps({"rollout_id": rollout, "key": "param:1"})}])
    deadline = time.monotonic() + 10
    found = []
    while not found and time.monotonic() < deadline:
        found = logs.filter_log_events(logGroupName=group, filterPattern=f'"{rollout}"')["events"]
    assert len(found) == 1, found
    assert isinstance(found[0]["timestamp"], int), found[0]
    assert isinstance(found[0]["ingestionTime"], int), found[0]
    assert json.loads(found[0]["message"])["detail"]["rollout_id"] == rollout
    assert logs.filter_log_events(logGroupName=group, filterPattern='"/golden/other@ami-00000000"')["events"] == []
