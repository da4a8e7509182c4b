"""amiflow's Auto Scaling extensions to moto 5.2.5 (see docs/EMULATOR.md).

- Instance refresh: StartInstanceRefresh, DescribeInstanceRefreshes, CancelInstanceRefresh,
  RollbackInstanceRefresh, with time-driven statuses and EventBridge events
  (autoscaling_refresh.py).
- Group launches that take every field from the group's requested launch template version, resolve
  `$Latest` / `$Default` and `resolve:ssm:` image ids, and report each instance's real version;
  UpdateAutoScalingGroup that leaves an omitted MixedInstancesPolicy alone (autoscaling_launch.py).

moto resolves an action by looking up `camelcase_to_underscores(Action)` among the functions of
AutoScalingResponse on every request, so plain functions set on that class become new actions (a
subclass would not be used: urls.py bound `AutoScalingResponse.dispatch` at import).

Concurrency: moto's server is threaded and has no lock of its own. One re-entrant LOCK guards the
refresh state and every change this module makes to groups and instances: it is held by the
Auto Scaling request handler, by the EC2 request handler (the ticker launches and terminates EC2
instances, which a concurrent DescribeInstances would otherwise iterate over mid-change) and by the
ticker thread that advances refreshes when nobody polls.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from moto.autoscaling.models import AutoScalingBackend, autoscaling_backends
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult

from . import autoscaling_launch, autoscaling_refresh as refresh

log = logging.getLogger("amiflow_shim.autoscaling")

LOCK = threading.RLock()
FAIL_TAG = refresh.FAIL_TAG
STEP_ENV = refresh.STEP_ENV

_originals: dict[str, Any] = {}
_ticker: _Ticker | None = None


# --- new actions on AutoScalingResponse ----------------------------------------------------------


def start_instance_refresh(self: AutoScalingResponse) -> ActionResult:
    params = self._get_params()
    r = refresh.start(
        self.autoscaling_backend,
        params.get("AutoScalingGroupName"),
        params.get("Strategy"),
        params.get("DesiredConfiguration"),
        params.get("Preferences"),
    )
    return ActionResult({"InstanceRefreshId": r.id})


def describe_instance_refreshes(self: AutoScalingResponse) -> ActionResult:
    params = self._get_params()
    max_records = params.get("MaxRecords")
    items, token = refresh.describe(
        self.autoscaling_backend,
        params.get("AutoScalingGroupName"),
        params.get("InstanceRefreshIds"),
        int(max_records) if max_records is not None else None,
        params.get("NextToken"),
    )
    return ActionResult({"InstanceRefreshes": items, "NextToken": token})


def cancel_instance_refresh(self: AutoScalingResponse) -> ActionResult:
    r = refresh.cancel(self.autoscaling_backend, self._get_param("AutoScalingGroupName"))
    return ActionResult({"InstanceRefreshId": r.id})


def rollback_instance_refresh(self: AutoScalingResponse) -> ActionResult:
    r = refresh.rollback(self.autoscaling_backend, self._get_param("AutoScalingGroupName"))
    return ActionResult({"InstanceRefreshId": r.id})


# --- advancing: on every Auto Scaling request, and from a ticker thread --------------------------


def _autoscaling_call_action(self: AutoScalingResponse) -> Any:
    with LOCK:
        # Advance this account's refreshes first, so a poll sees every transition that is due.
        refresh.advance_backend(autoscaling_backends[self.current_account][self.region])
        return _originals["AutoScalingResponse.call_action"](self)


def _ec2_call_action(self: Any) -> Any:
    with LOCK:
        return _originals["EC2Response.call_action"](self)


def _notify_terminate_instances(self: AutoScalingBackend, instance_ids: list[str]) -> None:
    with LOCK:
        _originals["AutoScalingBackend.notify_terminate_instances"](self, instance_ids)


def advance_all() -> None:
    """Advance every account's and region's refreshes. Iterates over copies and never indexes
    `autoscaling_backends[...]`, which would create backends as a side effect."""
    with LOCK:
        for _account, regions in list(autoscaling_backends.items()):
            for _region, backend in list(regions.items()):
                if getattr(backend, "amiflow_refreshes", None):
                    try:
                        refresh.advance_backend(backend)
                    except Exception:  # noqa: BLE001 - keep ticking for the other groups
                        log.exception("instance refresh tick failed")


REFRESHES_PATH = "/amiflow-emulator/refreshes"


def _refresh_rows() -> list[dict[str, Any]]:
    """Every refresh of every account: what benchmarks need to know how long refreshes ran."""
    rows = []
    with LOCK:
        for account, regions in list(autoscaling_backends.items()):
            for region, backend in list(regions.items()):
                for group, items in (getattr(backend, "amiflow_refreshes", None) or {}).items():
                    for r in items:
                        rows.append({
                            "account": account,
                            "region": region,
                            "group": group,
                            "id": r.id,
                            "status": r.status,
                            "seconds": (r.end_time - r.start_time).total_seconds() if r.end_time else None,
                        })
    return rows


def wrap_app(app):
    """``GET /amiflow-emulator/refreshes``: ``{"refreshes": [{"account", "region", "group", "id",
    "status", "seconds"}...]}``, ``seconds`` from start to end (null while active)."""

    def middleware(environ, start_response):
        if environ.get("PATH_INFO") != REFRESHES_PATH:
            return app(environ, start_response)
        payload = json.dumps({"refreshes": _refresh_rows()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return middleware


class _Ticker(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(name="amiflow-refresh-ticker", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            advance_all()


# --- shim entry points ---------------------------------------------------------------------------


def apply() -> None:
    if _originals:
        return
    from moto.ec2.responses import EC2Response

    refresh.configure()
    autoscaling_launch.apply()

    _originals["AutoScalingResponse.call_action"] = AutoScalingResponse.call_action
    _originals["EC2Response.call_action"] = EC2Response.call_action
    _originals["AutoScalingBackend.notify_terminate_instances"] = AutoScalingBackend.notify_terminate_instances
    AutoScalingResponse.call_action = _autoscaling_call_action  # type: ignore[method-assign]
    EC2Response.call_action = _ec2_call_action  # type: ignore[method-assign]
    AutoScalingBackend.notify_terminate_instances = _notify_terminate_instances  # type: ignore[method-assign]

    for handler in (
        start_instance_refresh,
        describe_instance_refreshes,
        cancel_instance_refresh,
        rollback_instance_refresh,
    ):
        setattr(AutoScalingResponse, handler.__name__, handler)


def start_background() -> None:
    global _ticker
    if _ticker is None:
        _ticker = _Ticker(interval=max(0.05, min(0.25, refresh.STEP / 4)))
        _ticker.start()


def stop_background() -> None:
    global _ticker
    if _ticker is not None:
        _ticker.stopped.set()
        _ticker.join(timeout=5)
        _ticker = None
