"""Count every AWS API call the emulator serves, by caller, service and action, with the time the
server spent on it, so benchmarks report calls that were counted, not estimated.

The caller is the access key id from the request's SigV4 ``Authorization`` header (each
``sts:AssumeRole`` returns new keys, so a harness that gives every worker its own session can
tell workers apart); the service comes from the same credential scope; the action from
``X-Amz-Target`` (JSON protocols) or the ``Action`` parameter (query protocols).

``GET /amiflow-emulator/calls`` returns ``{"calls": [{"key", "service", "action", "count",
"seconds", "cpu_seconds"}...]}``; ``POST /amiflow-emulator/calls`` returns the same and starts
counting afresh. ``seconds`` is the wall time a call spent in the server (a long poll's wait
included); ``cpu_seconds`` the CPU time of the thread serving it, which is what the server
actually spent on the call (werkzeug serves each request on a thread of its own).
``process_cpu_seconds`` is the CPU time of the whole emulator process so far (every thread: the
calls, and the background work they cause, such as the instance-refresh ticker replacing
instances); benchmarks take differences of it.
"""

import io
import json
import threading
import time
from urllib.parse import parse_qs

PATH = "/amiflow-emulator/calls"
_lock = threading.Lock()
_counts = {}


def apply():
    pass


def _credential(environ):
    auth = environ.get("HTTP_AUTHORIZATION", "")
    marker = "Credential="
    start = auth.find(marker)
    if start < 0:
        return "", ""
    scope = auth[start + len(marker):].split(",", 1)[0].split("/")
    if len(scope) < 4:
        return scope[0] if scope else "", ""
    return scope[0], scope[3]


def _action(environ):
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return target.rsplit(".", 1)[-1]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "Action" in query:
        return query["Action"][0]
    if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        # Put the body back for moto.
        environ["wsgi.input"] = io.BytesIO(body)
        form = parse_qs(body.decode("utf-8", "replace"))
        if "Action" in form:
            return form["Action"][0]
    return environ.get("REQUEST_METHOD", "") + " " + environ.get("PATH_INFO", "")


def _snapshot(reset):
    with _lock:
        rows = [
            {"key": k, "service": s, "action": a, "count": c, "seconds": round(t, 6), "cpu_seconds": round(cpu, 6)}
            for (k, s, a), (c, t, cpu) in sorted(_counts.items())
        ]
        if reset:
            _counts.clear()
    return {"calls": rows, "process_cpu_seconds": time.process_time()}


def wrap_app(app):
    def middleware(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == PATH:
            payload = json.dumps(_snapshot(environ.get("REQUEST_METHOD") == "POST")).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(payload)))])
            return [payload]
        if path.startswith("/amiflow-emulator/") or path.startswith("/moto-api"):
            return app(environ, start_response)
        key, service = _credential(environ)
        action = _action(environ)
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return app(environ, start_response)
        finally:
            spent, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
            with _lock:
                count, seconds, cpu_seconds = _counts.get((key, service, action), (0, 0.0, 0.0))
                _counts[(key, service, action)] = (count + 1, seconds + spent, cpu_seconds + cpu)

    return middleware
