"""Fixtures for the shim's own boto3 checks: one launcher process per test session on a free port."""

import json
import os
import subprocess
import sys

import boto3
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(os.path.dirname(HERE), "launcher.py")
REGION = "us-east-1"


@pytest.fixture(scope="session")
def endpoint():
    env = dict(os.environ, AMIFLOW_REFRESH_STEP_SECONDS=os.environ.get("AMIFLOW_REFRESH_STEP_SECONDS", "0.2"))
    proc = subprocess.Popen([sys.executable, LAUNCHER, "--port", "0"], stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    ready = json.loads(line)
    assert ready["event"] == "ready"
    yield f"http://127.0.0.1:{ready['port']}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def session_for(endpoint):
    """Return a function account_id -> boto3 Session acting in that account (via sts:AssumeRole)."""

    def make(account):
        sts = boto3.client(
            "sts", endpoint_url=endpoint, region_name=REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        creds = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/amiflow", RoleSessionName="test")["Credentials"]
        return boto3.Session(
            aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"], region_name=REGION,
        )

    return make
