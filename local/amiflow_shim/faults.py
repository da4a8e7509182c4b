"""Test-controlled faults inside the emulator, for behaviour moto never shows by itself.

AWS's PutEvents can answer 200 while rejecting some entries (``FailedEntryCount`` > 0, an
``ErrorCode`` per failed entry); moto never does. A test asks for N such replies with
``POST /amiflow-emulator/faults`` and JSON ``{"put_events_partial_failures": N}``; each of the next N
PutEvents calls with more than zero entries rejects its first entry with ``InternalFailure``
(that entry is not delivered) and delivers the rest. ``GET /amiflow-emulator/faults`` reports what
is still pending and what was injected.

IAM is never enforced by moto, so a worker whose role lacks a permission cannot be shown either.
``{"deny": [{"account": "222222222222", "action": "ec2:CreateLaunchTemplateVersion", "times": 1}]}``
makes the next ``times`` such calls from that account fail the way AWS refuses them: EC2 with
``UnauthorizedOperation`` (HTTP 403, EC2's XML), other query services (Auto Scaling) with
``AccessDenied`` (403, ``ErrorResponse`` XML), JSON services (SSM) with ``AccessDeniedException``
(400). A new ``deny`` list replaces the pending one; ``denied`` counts what was refused.
"""

import io
import json
import threading
import uuid
from urllib.parse import parse_qs

_lock = threading.Lock()
_state = {"put_events_partial_failures": 0, "injected_put_events_failures": 0, "deny": [], "denied": 0}


def _caller(environ, body):
    """(service, action, account) of an AWS request, or None when it cannot be told."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if "Credential=" not in auth:
        return None
    # Credential=<access key>/<date>/<region>/<service>/aws4_request
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
    if len(scope) < 4:
        return None
    access_key, service = scope[0], scope[3]
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        action = target.rsplit(".", 1)[-1]
    else:
        action = (parse_qs(body.decode("utf-8", "replace")).get("Action") or [""])[0]
    from moto.iam.models import get_account_id_from

    return service, action, get_account_id_from(access_key), bool(target)


def _refusal(service, action, account, json_protocol):
    what = f"{service}:{action}"
    message = (f"User: arn:aws:sts::{account}:assumed-role/amiflow-worker/emulator is not authorized to perform: "
               f"{what} because no identity-based policy allows the {what} action")
    request_id = str(uuid.uuid4())
    if json_protocol:
        body = json.dumps({"__type": "AccessDeniedException", "message": message})
        return "400 Bad Request", "application/x-amz-json-1.1", body
    if service == "ec2":
        body = (f"<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to "
                f"perform this operation. {message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>")
        return "403 Forbidden", "text/xml", body
    body = (f"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{message}</Message></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>")
    return "403 Forbidden", "text/xml", body


def _denied(environ):
    """Read the request body (and put it back for moto); answer a refusal if a deny rule matches."""
    with _lock:
        if not _state["deny"]:
            return None
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    caller = _caller(environ, body)
    if caller is None:
        return None
    service, action, account, json_protocol = caller
    with _lock:
        for rule in _state["deny"]:
            if rule.get("times", 0) > 0 and rule.get("account") == account and rule.get("action") == f"{service}:{action}":
                rule["times"] -= 1
                _state["denied"] += 1
                return _refusal(service, action, account, json_protocol)
    return None


def apply():
    from moto.events import models

    original = models.EventsBackend.put_events
    if getattr(original, "_amiflow_faults", False):
        return

    def put_events(self, events):
        with _lock:
            inject = _state["put_events_partial_failures"] > 0 and len(events) > 0
            if inject:
                _state["put_events_partial_failures"] -= 1
                _state["injected_put_events_failures"] += 1
        if not inject:
            return original(self, events)
        rest = original(self, events[1:]) if len(events) > 1 else []
        failed = {"ErrorCode": "InternalFailure", "ErrorMessage": "Injected by amiflow-emulator faults."}
        return [failed] + list(rest)

    put_events._amiflow_faults = True
    models.EventsBackend.put_events = put_events


def wrap_app(app):
    def middleware(environ, start_response):
        if environ.get("PATH_INFO") != "/amiflow-emulator/faults":
            refusal = _denied(environ)
            if refusal is None:
                return app(environ, start_response)
            status, content_type, text = refusal
            data = text.encode()
            start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
            return [data]
        if environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with _lock:
                for key, value in body.items():
                    if key in _state and isinstance(value, int) and value >= 0:
                        _state[key] = value
                if isinstance(body.get("deny"), list):
                    _state["deny"] = [dict(rule) for rule in body["deny"] if isinstance(rule, dict)]
        with _lock:
            payload = json.dumps(_state).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return middleware
