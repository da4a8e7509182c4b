"""Test-controlled faults inside the emulator, for behaviour moto never shows by itself.

AWS's PutEvents can answer 200 while rejecting some entries (``FailedEntryCount`` > 0, an
``ErrorCode`` per failed entry); moto never does. A test asks for N such replies with
``POST /amiflow-emulator/faults`` and JSON ``{"put_events_partial_failures": N}``; each of the next N
PutEvents calls with more than zero entries rejects its first entry with ``InternalFailure``
(that entry is not delivered) and delivers the rest. ``GET /amiflow-emulator/faults`` reports what
is still pending and what was injected.
"""

import json
import threading

_lock = threading.Lock()
_state = {"put_events_partial_failures": 0, "injected_put_events_failures": 0}


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
            return app(environ, start_response)
        if environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with _lock:
                for key, value in body.items():
                    if key in _state and isinstance(value, int) and value >= 0:
                        _state[key] = value
        with _lock:
            payload = json.dumps(_state).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return middleware
