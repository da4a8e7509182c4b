"""The boto3 baseline of `just bench-runtime`: the same no-op loop as amiflow's probe worker.

Connects to $AMIFLOW_QUEUE_URL the way the runtime does (reads the queue's attributes), says
"worker started" on stderr, then long-polls and deletes whatever arrives, doing nothing with it.
The benchmark times start-up to that line and samples the idle process's resident memory.
"""

import os
import sys

import boto3


def main():
    queue = os.environ["AMIFLOW_QUEUE_URL"]
    sqs = boto3.client("sqs", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                       region_name=os.environ.get("AWS_REGION", "us-east-1"))
    sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["VisibilityTimeout", "RedrivePolicy"])
    print("worker started", file=sys.stderr, flush=True)
    while True:
        got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=20)
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                   for i, m in enumerate(got.get("Messages", []))]
        if entries:
            sqs.delete_message_batch(QueueUrl=queue, Entries=entries)


if __name__ == "__main__":
    main()
