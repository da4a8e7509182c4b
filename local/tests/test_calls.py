"""boto3 checks of amiflow_shim.calls: every API call counted by caller key, service and action."""

import json
import random
import urllib.request


def snapshot(endpoint, method="GET"):
    req = urllib.request.Request(f"{endpoint}/amiflow-emulator/calls", method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)


def calls(endpoint, method="GET"):
    return snapshot(endpoint, method)["calls"]


def test_calls_are_counted_per_caller_service_and_action(session_for, endpoint):
    session = session_for(str(random.randint(10**11, 10**12 - 1)))
    key = session.get_credentials().access_key
    sqs = session.client("sqs", endpoint_url=endpoint)      # JSON protocol (X-Amz-Target)
    asg = session.client("autoscaling", endpoint_url=endpoint)  # query protocol (form body)
    url = sqs.create_queue(QueueName="counted")["QueueUrl"]
    for _ in range(3):
        sqs.send_message(QueueUrl=url, MessageBody="x")
    asg.describe_auto_scaling_groups()
    mine = {(c["service"], c["action"]): c for c in calls(endpoint) if c["key"] == key}
    assert mine[("sqs", "CreateQueue")]["count"] == 1
    assert mine[("sqs", "SendMessage")]["count"] == 3
    assert mine[("autoscaling", "DescribeAutoScalingGroups")]["count"] == 1
    assert all(c["cpu_seconds"] > 0 and c["seconds"] > 0 for c in mine.values()), mine
    # The form body was put back: the call above returned real data, and this one still works.
    assert asg.describe_auto_scaling_groups()["AutoScalingGroups"] == []
    # POST returns the counts and starts afresh.
    assert any(c["key"] == key for c in calls(endpoint, "POST"))
    assert not any(c["key"] == key for c in calls(endpoint))


def test_the_process_cpu_time_grows_with_the_work_served(session_for, endpoint):
    session = session_for(str(random.randint(10**11, 10**12 - 1)))
    asg = session.client("autoscaling", endpoint_url=endpoint)
    before = snapshot(endpoint)["process_cpu_seconds"]
    for _ in range(20):
        asg.describe_auto_scaling_groups()
    after = snapshot(endpoint)["process_cpu_seconds"]
    mine = sum(c["cpu_seconds"] for c in calls(endpoint) if c["key"] == session.get_credentials().access_key)
    # The whole process spent at least what its threads spent serving these calls.
    assert after - before >= mine > 0
