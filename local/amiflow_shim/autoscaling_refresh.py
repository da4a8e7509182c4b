"""Instance refresh for moto's Auto Scaling groups: model, time-driven state machine, events.

moto 5.2.5 has no instance refresh at all. State lives on the per-account, per-region Auto Scaling
backend (attribute `amiflow_refreshes`: group name -> refreshes, newest first), so /moto-api/reset
clears it. Callers hold `LOCK` around everything here (request handlers and the ticker thread).

Timeline, one phase per `STEP` seconds (env AMIFLOW_REFRESH_STEP_SECONDS):
  Pending -> InProgress (event "Started"; one batch of instances replaced per step;
  "Checkpoint Reached" pauses one step) -> [Baking, one step, if BakeTime > 0] -> Successful.
  Cancel: Cancelling -> Cancelled. Rollback (manual, or AutoRollback on failure):
  RollbackInProgress -> RollbackSuccessful. Failure without AutoRollback: Failed.

Failure injection: a group tagged FAIL_TAG = "fail" gets replacement instances that "fail their
health checks" one step after launch; one tagged FAIL_TAG = "hold" has its refresh stay
InProgress, replacing nothing, until it is cancelled or rolled back (a refresh that outlasts any
poll, for tests of what happens while one runs). A CloudWatch alarm named in AlarmSpecification that is in
ALARM state fails the refresh the same way. A launch that cannot happen (deleted SSM parameter or
template version) fails it too.

Replacement: the batch size follows Min/MaxHealthyPercentage. With MaxHealthyPercentage above 100
a batch launches before the instances it replaces terminate: its replacements join the group (above
its desired capacity) one step, and the replaced instances leave the next, once the replacements are
healthy (unhealthy ones are terminated instead, and the replaced instances stay). At 100 or less a
batch is replaced within one step (launched, then the old terminated, so a launch that cannot
happen leaves the group whole).

Simplifications: InstanceWarmup and CheckpointDelay / BakeTime durations are not waited (one step
each); only the Rolling strategy; no warm pools.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import uuid
from typing import Any

from moto.autoscaling.exceptions import AutoscalingClientError, ValidationError
from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup
from moto.core.utils import utcnow

from . import autoscaling_launch as launching

log = logging.getLogger("amiflow_shim.autoscaling")

FAIL_TAG = "amiflow:emulator-refresh-outcome"
STEP_ENV = "AMIFLOW_REFRESH_STEP_SECONDS"
STEP = 1.0  # seconds per phase; set from STEP_ENV by configure()

ACTIVE = {"Pending", "InProgress", "Baking", "Cancelling", "RollbackInProgress"}
CANCELLABLE = {"Pending", "InProgress", "Baking", "RollbackInProgress"}
ROLLBACKABLE = {"Pending", "InProgress", "Baking"}


def configure() -> None:
    global STEP
    STEP = float(os.environ.get(STEP_ENV, "1.0"))


# --- errors (codes and messages as AWS answers them) ---------------------------------------------


class InstanceRefreshInProgressError(AutoscalingClientError):
    code = "InstanceRefreshInProgress"
    message = "An Instance Refresh is already in progress and blocks the execution of this Instance Refresh."


class ActiveInstanceRefreshNotFoundError(AutoscalingClientError):
    code = "ActiveInstanceRefreshNotFound"

    def __init__(self, group_name: str):
        super().__init__(f"No in progress or pending Instance Refresh found for Auto Scaling group {group_name}")


class IrreversibleInstanceRefreshError(AutoscalingClientError):
    code = "IrreversibleInstanceRefresh"


class InvalidNextTokenError(AutoscalingClientError):
    code = "InvalidNextToken"
    message = "The token provided is not valid."


# --- model ---------------------------------------------------------------------------------------


class InstanceRefresh:
    def __init__(
        self,
        group: FakeAutoScalingGroup,
        strategy: str,
        desired: dict[str, Any] | None,
        preferences: dict[str, Any],
        target: launching.LaunchSpec | None,
    ):
        self.id = str(uuid.uuid4())
        self.group_name = group.name
        self.group_id = group._id  # a re-created group of the same name has another history
        self.group_arn = group.arn
        self.status = "Pending"
        self.status_reason: str | None = None
        self.start_time = utcnow()
        self.end_time = None
        self.strategy = strategy
        self.desired = desired
        self.preferences = preferences
        self.percentage_complete = 0
        self.instances_to_update = 0
        self.rollback_details: dict[str, Any] | None = None
        # Internal progress.
        self.target = target  # None: the group's own configuration, resolved when InProgress starts
        self.next_at = time.monotonic() + STEP
        self.total = 0  # instances in scope
        self.done = 0  # of which up to date (matching, or replaced)
        self.to_replace: list[str] = []
        self.launched: list[str] = []  # instances this refresh launched (undone by a rollback)
        self.checkpoints = list(preferences.get("CheckpointPercentages") or [])
        self.goal = self.checkpoints[-1] if self.checkpoints else 100
        self.waiting_checkpoint = False
        self.unhealthy_launched = False  # failure injection: a failing batch is in service
        # Launch before terminate (MaxHealthyPercentage > 100): the instances of the last batch,
        # still in service beside their replacements, and those replacements.
        self.held: list[str] = []
        self.held_new: list[str] = []

    def describe(self) -> dict[str, Any]:
        progress = {"PercentageComplete": self.percentage_complete, "InstancesToUpdate": self.instances_to_update}
        return {
            "InstanceRefreshId": self.id,
            "AutoScalingGroupName": self.group_name,
            "Status": self.status,
            "StatusReason": self.status_reason,
            "StartTime": self.start_time,
            "EndTime": self.end_time,
            "PercentageComplete": self.percentage_complete,
            "InstancesToUpdate": self.instances_to_update,
            "ProgressDetails": {"LivePoolProgress": progress},
            "Preferences": copy.deepcopy(self.preferences),
            "DesiredConfiguration": copy.deepcopy(self.desired),
            "RollbackDetails": copy.deepcopy(self.rollback_details),
            "Strategy": self.strategy,
        }

    def update_progress(self) -> None:
        self.percentage_complete = 100 if self.total == 0 else math.floor(self.done * 100 / self.total)
        self.instances_to_update = len(self.to_replace)


def refreshes(backend: AutoScalingBackend) -> dict[str, list[InstanceRefresh]]:
    store = getattr(backend, "amiflow_refreshes", None)
    if store is None:
        store = backend.amiflow_refreshes = {}  # type: ignore[attr-defined]
    return store


def group_refreshes(backend: AutoScalingBackend, group: FakeAutoScalingGroup) -> list[InstanceRefresh]:
    return [r for r in refreshes(backend).get(group.name, []) if r.group_id == group._id]


def active_refresh(backend: AutoScalingBackend, group: FakeAutoScalingGroup) -> InstanceRefresh | None:
    return next((r for r in group_refreshes(backend, group) if r.status in ACTIVE), None)


def get_group(backend: AutoScalingBackend, name: str) -> FakeAutoScalingGroup:
    group = backend.autoscaling_groups.get(name)
    if group is None:
        raise ValidationError(f"AutoScalingGroup name not found - AutoScalingGroup '{name}' not found")
    return group


# --- validation ----------------------------------------------------------------------------------


# Bounds of RefreshPreferences members (AWS API reference), checked as AWS's request validation
# does; botocore checks only the minimums before sending.
PREFERENCE_RANGES = {
    "MinHealthyPercentage": (0, 100),
    "MaxHealthyPercentage": (100, 200),
    "BakeTime": (0, 172800),
    "CheckpointDelay": (0, 172800),
    "InstanceWarmup": (0, None),
}


def normalize_preferences(prefs: dict[str, Any] | None) -> dict[str, Any]:
    """Validate Preferences and fill AWS's defaults, as DescribeInstanceRefreshes echoes them."""
    prefs = dict(prefs or {})
    for name, (low, high) in PREFERENCE_RANGES.items():
        value = prefs.get(name)
        if value is None:
            continue
        member = "preferences." + name[0].lower() + name[1:]
        if value < low:
            raise ValidationError(
                f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
                f"constraint: Member must have value greater than or equal to {low}"
            )
        if high is not None and value > high:
            raise ValidationError(
                f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
                f"constraint: Member must have value less than or equal to {high}"
            )
    if "MaxHealthyPercentage" in prefs:
        if "MinHealthyPercentage" not in prefs:
            raise ValidationError(
                "You must specify MinHealthyPercentage when you specify MaxHealthyPercentage."
            )
        if prefs["MaxHealthyPercentage"] - prefs["MinHealthyPercentage"] > 100:
            raise ValidationError(
                "The difference between MaxHealthyPercentage and MinHealthyPercentage can't be greater than 100."
            )
    checkpoints = prefs.get("CheckpointPercentages")
    if checkpoints:
        if any(b <= a for a, b in zip(checkpoints, checkpoints[1:])):
            raise ValidationError("CheckpointPercentages must be unique and in ascending order.")
        prefs.setdefault("CheckpointDelay", 3600)
    out = {
        "MinHealthyPercentage": 90,
        "SkipMatching": False,
        "AutoRollback": False,
        "ScaleInProtectedInstances": "Ignore",
        "StandbyInstances": "Ignore",
    }
    out.update(prefs)
    return out


def irreversible_reason(group: FakeAutoScalingGroup, desired: dict[str, Any] | None) -> str | None:
    """Why a rollback to the group's current configuration is impossible (None if it is possible)."""
    if not desired:
        return "The instance refresh can't be rolled back because it has no desired configuration."
    if group.ec2_launch_template is not None:
        version = str(group.launch_template_version or "$Default")
        if version.lower() in ("$latest", "$default"):
            return (
                "The instance refresh can't be rolled back because the Auto Scaling group uses the "
                f"launch template's {version} version."
            )
        try:
            image_id = group.ec2_launch_template.get_version(version).data.get("ImageId") or ""
        except Exception:  # noqa: BLE001 - a deleted version: nothing to roll back to
            return f"The instance refresh can't be rolled back: launch template version {version} does not exist."
        if image_id.startswith(launching.SSM_PREFIX):
            return (
                "The instance refresh can't be rolled back because the Auto Scaling group's launch "
                "template uses a Systems Manager parameter instead of an AMI ID for ImageId."
            )
    return None


# --- events --------------------------------------------------------------------------------------


def emit(backend: AutoScalingBackend, r: InstanceRefresh, what: str, **extra: str) -> None:
    """Put an `aws.autoscaling` instance-refresh event on the account's default bus (best effort,
    as on AWS: a failing rule target must not break the refresh)."""
    from moto.events.models import events_backends

    detail = {"InstanceRefreshId": r.id, "AutoScalingGroupName": r.group_name, **extra}
    entry = {
        "Source": "aws.autoscaling",
        "DetailType": f"EC2 Auto Scaling Instance Refresh {what}",
        "Detail": json.dumps(detail),
        "Resources": [r.group_arn],
    }
    try:
        events_backends[backend.account_id][backend.region_name].put_events([entry])
    except Exception:  # noqa: BLE001 - best effort delivery
        log.exception("could not put instance refresh event %s for %s", what, r.id)


# --- state machine -------------------------------------------------------------------------------


def advance_backend(backend: AutoScalingBackend) -> None:
    now = time.monotonic()
    for history in list(refreshes(backend).values()):
        for r in history:
            if r.status in ACTIVE:
                advance(backend, r, now)


def advance(backend: AutoScalingBackend, r: InstanceRefresh, now: float) -> None:
    while r.status in ACTIVE and now >= r.next_at:
        group = backend.autoscaling_groups.get(r.group_name)
        if group is None or group._id != r.group_id:
            _finish(r, "Failed", "The Auto Scaling group was deleted.")
            return
        r.next_at += STEP
        step = {
            "Pending": _begin,
            "InProgress": _progress,
            "Baking": _succeed,
            "Cancelling": _cancelled,
            "RollbackInProgress": _rolled_back,
        }[r.status]
        try:
            step(backend, group, r)
        except Exception as err:  # noqa: BLE001
            # A launch that cannot happen (a deleted SSM parameter or template version, an AMI
            # gone) fails the refresh, as on AWS, instead of failing whichever request advanced it.
            log.warning("instance refresh %s failed in %s: %s", r.id, r.status, err)
            _finish(r, "RollbackFailed" if r.status == "RollbackInProgress" else "Failed",
                    f"Instance refresh failed: {getattr(err, 'message', None) or err}")
            emit(backend, r, r.status.replace("Rollback", "Rollback "))


def _finish(r: InstanceRefresh, status: str, reason: str | None) -> None:
    r.status = status
    r.status_reason = reason
    r.end_time = utcnow()


def _in_scope(group: FakeAutoScalingGroup, prefs: dict[str, Any]) -> list[Any]:
    states = []
    for s in group.instance_states:
        if s.lifecycle_state == "Standby":
            if prefs.get("StandbyInstances") != "Terminate":
                continue
        elif s.lifecycle_state != "InService":
            continue
        if s.protected_from_scale_in and prefs.get("ScaleInProtectedInstances") != "Refresh":
            continue
        states.append(s)
    return states


def _begin(backend: AutoScalingBackend, group: FakeAutoScalingGroup, r: InstanceRefresh) -> None:
    """Pending -> InProgress: fix the target (resolving $Latest/$Default now) and the work list."""
    r.target = (r.target or launching.spec_from_group(group)).pinned()
    key = r.target.key()
    scope = _in_scope(group, r.preferences)
    skip = bool(r.preferences.get("SkipMatching"))
    r.to_replace = [s.instance.id for s in scope if not (skip and launching.instance_key(s.instance) == key)]
    r.total = len(scope)
    r.done = r.total - len(r.to_replace)
    r.status = "InProgress"
    r.update_progress()
    emit(backend, r, "Started")


def _batch_size(group: FakeAutoScalingGroup, r: InstanceRefresh) -> int:
    capacity = group.desired_capacity or r.total or 1
    low = r.preferences.get("MinHealthyPercentage", 90)
    high = r.preferences.get("MaxHealthyPercentage", 100)
    return max(1, math.floor(capacity * (high - low) / 100))


def _alarm_in_alarm(backend: AutoScalingBackend, r: InstanceRefresh) -> str | None:
    names = (r.preferences.get("AlarmSpecification") or {}).get("Alarms") or []
    if not names:
        return None
    from moto.cloudwatch.models import cloudwatch_backends

    alarms = cloudwatch_backends[backend.account_id][backend.region_name].alarms
    return next((n for n in names if n in alarms and alarms[n].state_value == "ALARM"), None)


def _progress(backend: AutoScalingBackend, group: FakeAutoScalingGroup, r: InstanceRefresh) -> None:
    """One InProgress step: check health and alarms, then replace one batch."""
    if any(t.get("Key") == FAIL_TAG and t.get("Value") == "hold" for t in group.tags):
        return
    if r.waiting_checkpoint:
        r.waiting_checkpoint = False
        r.status_reason = None
        return
    if r.unhealthy_launched:
        _fail(backend, group, r, "Instance refresh failed: the replacement instances failed their health checks "
              f"(group tag {FAIL_TAG}=fail).")
        return
    _settle_batch(group, r)
    alarm = _alarm_in_alarm(backend, r)
    if alarm:
        _fail(backend, group, r, f"Instance refresh failed: CloudWatch alarm {alarm} is in ALARM state.")
        return

    # Instances that left the group meanwhile (terminated, detached) no longer need replacing.
    present = {s.instance.id for s in group.instance_states}
    gone = [i for i in r.to_replace if i not in present]
    if gone:
        r.to_replace = [i for i in r.to_replace if i in present]
        r.done += len(gone)
    if not r.to_replace or r.percentage_complete >= r.goal:
        r.update_progress()
        if r.preferences.get("BakeTime"):
            r.status = "Baking"
        else:
            _succeed(backend, group, r)
        return

    # Never replace beyond the last checkpoint (a last checkpoint under 100 stops the refresh there).
    allowed = max(1, math.ceil(r.goal * r.total / 100) - r.done)
    batch = r.to_replace[: min(_batch_size(group, r), allowed)]
    if r.preferences.get("MaxHealthyPercentage", 100) > 100:
        # Launch before terminate: the batch stays in service beside its replacements until the
        # next step (_settle_batch).
        new = [i.id for i in launching.launch(group, r.target, len(batch))]  # type: ignore[arg-type]
        r.held, r.held_new = list(batch), new
        r.launched += new
    else:
        r.launched += launching.replace_instances(group, batch, r.target)  # type: ignore[arg-type]
    if any(t.get("Key") == FAIL_TAG and t.get("Value") == "fail" for t in group.tags):
        # The new instances never become healthy: nothing counts as done; the next step fails.
        r.unhealthy_launched = True
        return
    r.to_replace = r.to_replace[len(batch):]
    r.done += len(batch)
    r.update_progress()

    reached = [c for c in r.checkpoints if c <= r.percentage_complete]
    if reached:
        r.checkpoints = [c for c in r.checkpoints if c > r.percentage_complete]
        delay = r.preferences.get("CheckpointDelay", 3600)
        for c in reached:
            emit(backend, r, "Checkpoint Reached", CheckpointPercentage=str(c), CheckpointDelay=str(delay))
        r.waiting_checkpoint = True
        # The emulator waits one step, not CheckpointDelay seconds.
        r.status_reason = f"Waiting for the checkpoint delay of {delay} seconds to elapse after reaching {reached[-1]}%."


def _settle_batch(group: FakeAutoScalingGroup, r: InstanceRefresh) -> None:
    """End a launch-before-terminate batch: healthy replacements take over (the instances they
    replace terminate); unhealthy ones are terminated and the instances they would replace stay."""
    if not r.held and not r.held_new:
        return
    if r.unhealthy_launched:
        gone = set(r.held_new)
        launching.terminate(group, r.held_new)
        r.launched = [i for i in r.launched if i not in gone]
        r.unhealthy_launched = False
    else:
        launching.terminate(group, r.held)
    r.held, r.held_new = [], []


def _succeed(backend: AutoScalingBackend, group: FakeAutoScalingGroup, r: InstanceRefresh) -> None:
    _settle_batch(group, r)
    if r.desired:
        launching.set_group_configuration(group, r.desired)
    _finish(r, "Successful", None)
    emit(backend, r, "Succeeded")


def _fail(backend: AutoScalingBackend, group: FakeAutoScalingGroup, r: InstanceRefresh, reason: str) -> None:
    _settle_batch(group, r)
    if r.preferences.get("AutoRollback"):
        start_rollback(backend, r, reason)
        return
    if r.unhealthy_launched:
        # On AWS the group's health checks then replace the unhealthy instances from the group's
        # configuration, which a refresh only changes when it succeeds.
        launching.replace_instances(group, r.launched, launching.spec_from_group(group))
    _finish(r, "Failed", reason)
    emit(backend, r, "Failed")


def start_rollback(backend: AutoScalingBackend, r: InstanceRefresh, reason: str) -> None:
    r.rollback_details = {
        "RollbackReason": reason,
        "RollbackStartTime": utcnow(),
        "PercentageCompleteOnRollback": r.percentage_complete,
        "InstancesToUpdateOnRollback": r.instances_to_update,
        "ProgressDetailsOnRollback": {
            "LivePoolProgress": {
                "PercentageComplete": r.percentage_complete,
                "InstancesToUpdate": r.instances_to_update,
            }
        },
    }
    r.status = "RollbackInProgress"
    r.status_reason = reason
    r.waiting_checkpoint = False
    r.next_at = time.monotonic() + STEP
    emit(backend, r, "Rollback Started")


def _rolled_back(backend: AutoScalingBackend, group: FakeAutoScalingGroup, r: InstanceRefresh) -> None:
    """Replace what the refresh launched with the group's configuration, unchanged since the start."""
    _settle_batch(group, r)
    launching.replace_instances(group, r.launched, launching.spec_from_group(group))
    r.percentage_complete = 0
    _finish(r, "RollbackSuccessful", r.status_reason)
    emit(backend, r, "Rollback Succeeded")


def _cancelled(backend: AutoScalingBackend, group: FakeAutoScalingGroup, r: InstanceRefresh) -> None:
    _settle_batch(group, r)
    _finish(r, "Cancelled", r.status_reason)
    emit(backend, r, "Cancelled")


# --- API operations (called by the response handlers, under LOCK) --------------------------------


def start(
    backend: AutoScalingBackend,
    group_name: str,
    strategy: str | None,
    desired: dict[str, Any] | None,
    preferences: dict[str, Any] | None,
) -> InstanceRefresh:
    group = get_group(backend, group_name)
    if active_refresh(backend, group) is not None:
        raise InstanceRefreshInProgressError()
    strategy = strategy or "Rolling"
    if strategy != "Rolling":
        raise ValidationError(f"The emulator supports only the Rolling strategy, not {strategy}.")
    prefs = normalize_preferences(preferences)
    desired = copy.deepcopy(desired) or None
    target = launching.spec_from_configuration(backend.ec2_backend, desired) if desired else None
    if prefs["AutoRollback"]:
        if not desired:
            raise ValidationError(
                "The request isn't valid. The AutoRollback parameter cannot be set to true when the "
                "DesiredConfiguration parameter is empty. Set AutoRollback to false or specify a "
                "desired configuration and try again."
            )
        reason = irreversible_reason(group, desired)
        if reason:
            raise ValidationError(f"The AutoRollback parameter cannot be set to true. {reason}")
    r = InstanceRefresh(group, strategy, desired, prefs, target)
    refreshes(backend).setdefault(group.name, []).insert(0, r)
    return r


def describe(
    backend: AutoScalingBackend,
    group_name: str,
    ids: list[str] | None,
    max_records: int | None,
    next_token: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    max_records = 50 if max_records is None else max_records
    if not 1 <= max_records <= 100:
        raise ValidationError("MaxRecords must be between 1 and 100.")
    group = backend.autoscaling_groups.get(group_name)
    found = group_refreshes(backend, group) if group is not None else []
    if ids:
        found = [r for r in found if r.id in ids]
    start_at = 0
    if next_token:
        index = next((i for i, r in enumerate(found) if r.id == next_token), None)
        if index is None:
            raise InvalidNextTokenError()
        start_at = index + 1
    page = found[start_at : start_at + max_records]
    token = page[-1].id if start_at + max_records < len(found) else None
    return [r.describe() for r in page], token


def cancel(backend: AutoScalingBackend, group_name: str) -> InstanceRefresh:
    group = get_group(backend, group_name)
    r = active_refresh(backend, group)
    if r is None or r.status not in CANCELLABLE:
        raise ActiveInstanceRefreshNotFoundError(group_name)
    r.status = "Cancelling"
    r.status_reason = "The instance refresh was cancelled by a CancelInstanceRefresh request."
    r.next_at = time.monotonic() + STEP
    return r


def rollback(backend: AutoScalingBackend, group_name: str) -> InstanceRefresh:
    group = get_group(backend, group_name)
    r = active_refresh(backend, group)
    if r is None or r.status not in ROLLBACKABLE:
        raise ActiveInstanceRefreshNotFoundError(group_name)
    reason = irreversible_reason(group, r.desired)
    if reason:
        raise IrreversibleInstanceRefreshError(reason)
    start_rollback(backend, r, "The rollback was started by a RollbackInstanceRefresh request.")
    return r
