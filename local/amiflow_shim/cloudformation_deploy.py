"""CloudFormation of amiflow's own deploy templates (deploy/hub.yaml, deploy/spoke.yaml) in moto,
and EventBridge Scheduler schedules that can be fired.

What moto 5.2.5 does with those templates and what this module changes:

* Parameter constraints (``AllowedPattern``, ``AllowedValues``, ``Min``/``MaxLength``, ``Min``/``MaxValue``,
  per item for ``CommaDelimitedList``) and the template's ``Rules`` were never checked: moto created
  a stack with any values. Here ``CreateStack`` refuses them with CloudFormation's
  ``ValidationError`` (the ``ConstraintDescription`` or ``AssertDescription`` as the message).
* ``Transform: AWS::LanguageExtensions`` was ignored, so the hub's ``Fn::ForEach::Spokes`` reached
  the resource parser as a list (HTTP 500). Here ``Fn::ForEach`` in Resources, Outputs and
  Conditions is expanded before the stack is built, as CloudFormation does: the collection is a
  literal list or a ``Ref`` to a list parameter; in the fragment, ``${Id}`` / ``&{Id}`` in keys and
  ``Fn::Sub`` strings and ``{"Ref": Id}`` become each item. Only at create (the deploy test creates
  stacks; nothing updates them).
* The YAML short form ``!Condition X`` became ``{"Fn::Condition": X}``, which moto's condition
  evaluator ignores: ``!Not [!Condition IsHubAccount]`` was true in the hub account too, and the
  spoke stack there tried to create a second ``amiflow`` bus. Here it becomes ``{"Condition": X}``.
* ``Ref`` of an ``AWS::Events::EventBus`` returned moto's Python object (a rule with
  ``EventBusName: !Ref Bus`` failed with a 500); AWS returns the bus name. The bus's ``Policy``
  property was dropped; here it becomes the bus policy (stored, as moto stores every policy:
  moto enforces none, so forwarding works whatever it says).
* ``AWS::IAM::RolePolicy`` and ``AWS::SQS::QueuePolicy`` were skipped ("No Moto CloudFormation
  support"). Here they put the inline role policy and the queues' ``Policy`` attribute (stored, not
  enforced).
* ``AWS::Scheduler::Schedule`` was skipped. Here it creates the schedule in moto's Scheduler
  backend (``Ref`` is its name, ``GetAtt Arn``). moto never runs a schedule, and tests cannot wait
  for a cron, so ``POST /amiflow-emulator/scheduler/fire`` with
  ``{"account", "region", "name", "group"?, "scheduled_time"}`` does what the Scheduler does at that
  scheduled time: replaces the context attributes (``<aws.scheduler.scheduled-time>``,
  ``-schedule-arn>``, ``-execution-id>``, ``-attempt-number>``) in the target's ``Input`` and, for an
  event bus target, puts one event with the target's ``EventBridgeParameters`` (``Source``,
  ``DetailType``) on that bus. A ``DISABLED`` schedule is refused (409), as it would not fire. The
  reply is ``{"entries": [...], "detail": <rendered input>}``.

Lambda functions are not touched: moto cannot run them (no container runtime here), and its SQS
would hand a queue's messages to an event source mapping inside ``SendMessage``. The deploy test
uses the templates' ``WorkerRuntime=service`` (no functions) and runs the workers as processes.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from typing import Any

_orig: dict[str, Any] = {}
_FOREACH = "Fn::ForEach::"
_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# AWS::LanguageExtensions: Fn::ForEach
# --------------------------------------------------------------------------------------------


def _collection(value: Any, parameters: dict[str, Any], template: dict[str, Any]) -> list[str]:
    """The items of a ForEach collection: a literal list, or a Ref to a list parameter."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict) and "Ref" in value:
        name = value["Ref"]
        slot = (template.get("Parameters") or {}).get(name) or {}
        raw = parameters.get(name, slot.get("Default", ""))
        if isinstance(raw, list):
            return [str(v) for v in raw]
        return [v.strip() for v in str(raw).split(",") if v.strip()]
    raise ValueError(f"Fn::ForEach collection {value!r} is not a list or a Ref to a list parameter")


def _substitute(node: Any, identifier: str, value: str) -> Any:
    """Replace the loop identifier in a fragment: Ref, ${id} / &{id} in Fn::Sub strings and keys."""
    placeholders = (f"${{{identifier}}}", f"&{{{identifier}}}")

    def text(s: str) -> str:
        for p in placeholders:
            s = s.replace(p, value)
        return s

    if isinstance(node, dict):
        if node == {"Ref": identifier}:
            return value
        out = {}
        for key, item in node.items():
            if key == "Fn::Sub" and isinstance(item, str):
                out[key] = text(item)
            elif key == "Fn::Sub" and isinstance(item, list) and item:
                out[key] = [text(item[0])] + [_substitute(i, identifier, value) for i in item[1:]]
            else:
                out[text(key)] = _substitute(item, identifier, value)
        return out
    if isinstance(node, list):
        return [_substitute(i, identifier, value) for i in node]
    return node


def _expand(section: dict[str, Any], parameters: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, body in section.items():
        if not key.startswith(_FOREACH):
            out[key] = body
            continue
        identifier, collection, fragment = body
        for item in _collection(collection, parameters, template):
            # Loops nest: an expanded fragment may hold another Fn::ForEach.
            out.update(_expand(_substitute(fragment, identifier, item), parameters, template))
    return out


def expand_language_extensions(template: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    transform = template.get("Transform")
    transforms = transform if isinstance(transform, list) else [transform]
    if "AWS::LanguageExtensions" not in transforms:
        return template
    template = dict(template)
    for section in ("Resources", "Outputs", "Conditions"):
        if isinstance(template.get(section), dict):
            template[section] = _expand(template[section], parameters, template)
    return template


def _condition_refs(node: Any) -> Any:
    """moto's YAML loader turns the short form ``!Condition X`` into ``{"Fn::Condition": X}``, which its
    condition evaluator does not know (``!Not [!Condition X]`` then came out true whatever X was);
    the long form is ``{"Condition": X}``."""
    if isinstance(node, dict):
        if len(node) == 1 and "Fn::Condition" in node:
            return {"Condition": node["Fn::Condition"]}
        return {k: _condition_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_condition_refs(v) for v in node]
    return node


# --------------------------------------------------------------------------------------------
# Parameter constraints and Rules, checked at CreateStack as CloudFormation does
# --------------------------------------------------------------------------------------------


def _violation(name: str, slot: dict[str, Any], value: str) -> str | None:
    """Why `value` breaks the constraints of parameter `name`, in CloudFormation's words."""
    ptype = str(slot.get("Type", "String"))
    described = slot.get("ConstraintDescription")

    def failed(default: str) -> str:
        return f"Parameter '{name}' {default}" if not described else f"Parameter {name} failed to satisfy constraint: {described}"

    items = [v.strip() for v in value.split(",")] if ptype in ("CommaDelimitedList", "List<Number>") else [value]
    for item in items:
        if "AllowedValues" in slot and item not in [str(v) for v in slot["AllowedValues"]]:
            return failed(f"must be one of {', '.join(str(v) for v in slot['AllowedValues'])}")
        pattern = slot.get("AllowedPattern")
        # CloudFormation matches the whole value (Java regex semantics; ours use no Java-only syntax).
        if pattern is not None and re.fullmatch(str(pattern), item) is None:
            return failed(f"must match pattern {pattern}")
        if "MinLength" in slot and len(item) < int(slot["MinLength"]):
            return failed(f"must contain at least {slot['MinLength']} characters")
        if "MaxLength" in slot and len(item) > int(slot["MaxLength"]):
            return failed(f"must contain at most {slot['MaxLength']} characters")
        if ptype in ("Number", "List<Number>"):
            try:
                number = float(item)
            except ValueError:
                return f"Parameter '{name}' must be a number"
            if "MinValue" in slot and number < float(slot["MinValue"]):
                return failed(f"must be a number not less than {slot['MinValue']}")
            if "MaxValue" in slot and number > float(slot["MaxValue"]):
                return failed(f"must be a number not greater than {slot['MaxValue']}")
    return None


def _rule_value(node: Any, values: dict[str, str]) -> Any:
    """Evaluate the rule functions the templates use (Equals, Not, And, Or, Contains, Ref)."""
    if isinstance(node, dict) and len(node) == 1:
        (fn, arg), = node.items()
        if fn == "Ref":
            return values.get(arg, "")
        if fn == "Fn::Equals":
            a, b = (_rule_value(x, values) for x in arg)
            return str(a) == str(b)
        if fn == "Fn::Not":
            return not _rule_value(arg[0], values)
        if fn == "Fn::And":
            return all(_rule_value(x, values) for x in arg)
        if fn == "Fn::Or":
            return any(_rule_value(x, values) for x in arg)
        if fn == "Fn::Contains":
            return str(_rule_value(arg[1], values)) in [str(_rule_value(x, values)) for x in arg[0]]
    if isinstance(node, list):
        return [_rule_value(x, values) for x in node]
    return node


def check_parameters(template: dict[str, Any], parameters: dict[str, Any]) -> None:
    from moto.cloudformation.exceptions import ValidationError

    slots = template.get("Parameters") or {}
    values: dict[str, str] = {}
    for name, slot in slots.items():
        value = parameters.get(name, slot.get("Default"))
        if value is None:
            continue  # moto itself reports a missing parameter
        value = ",".join(value) if isinstance(value, list) else str(value)
        values[name] = value
        problem = _violation(name, slot, value)
        if problem:
            raise ValidationError(message=problem)
    for rule_name, rule in (template.get("Rules") or {}).items():
        if "RuleCondition" in rule and not _rule_value(rule["RuleCondition"], values):
            continue
        for assertion in rule.get("Assertions") or []:
            if not _rule_value(assertion["Assert"], values):
                raise ValidationError(message=assertion.get("AssertDescription") or f"Rule {rule_name} failed")


def _create_resource_map(self):
    check_parameters(self.template_dict, self.parameters)
    template = expand_language_extensions(self.template_dict, self.parameters)
    self.template_dict = _condition_refs(template)
    return _orig["create_resource_map"](self)


# --------------------------------------------------------------------------------------------
# Event bus policy
# --------------------------------------------------------------------------------------------


def _bus_create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
    bus = _orig["bus_create"](resource_name, cloudformation_json, account_id, region_name, **kwargs)
    properties = cloudformation_json.get("Properties") or {}
    policy = properties.get("Policy")
    if isinstance(policy, str):
        policy = json.loads(policy)
    if policy:
        bus.add_policy(policy)
    if properties.get("Description"):
        bus.description = properties["Description"]
    return bus


# --------------------------------------------------------------------------------------------
# Resource types moto skips
# --------------------------------------------------------------------------------------------


def _define_models():
    from moto.core.common_models import CloudFormationModel

    class RolePolicy(CloudFormationModel):
        """AWS::IAM::RolePolicy: one inline policy on a role (Ref is not used by the templates)."""

        def __init__(self, role_name: str, policy_name: str):
            self.role_name, self.policy_name = role_name, policy_name

        @property
        def physical_resource_id(self) -> str:
            return f"{self.role_name}|{self.policy_name}"

        @staticmethod
        def cloudformation_name_type() -> str:
            return ""

        @staticmethod
        def cloudformation_type() -> str:
            return "AWS::IAM::RolePolicy"

        @classmethod
        def has_cfn_attr(cls, attr: str) -> bool:
            return False

        @classmethod
        def create_from_cloudformation_json(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
            from moto.iam.models import iam_backends

            props = cloudformation_json["Properties"]
            document = props["PolicyDocument"]
            iam_backends[account_id]["global"].put_role_policy(
                props["RoleName"], props["PolicyName"],
                document if isinstance(document, str) else json.dumps(document),
            )
            return cls(props["RoleName"], props["PolicyName"])

        @classmethod
        def update_from_cloudformation_json(cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name):
            return cls.create_from_cloudformation_json(new_resource_name, cloudformation_json, account_id, region_name)

        @classmethod
        def delete_from_cloudformation_json(cls, resource_name, cloudformation_json, account_id, region_name):
            from moto.iam.models import iam_backends

            props = cloudformation_json["Properties"]
            iam_backends[account_id]["global"].delete_role_policy(props["RoleName"], props["PolicyName"])

        def is_created(self) -> bool:
            return True

    class QueuePolicy(CloudFormationModel):
        """AWS::SQS::QueuePolicy: the Policy attribute of every queue URL in Queues."""

        def __init__(self, queues: list[str]):
            self.queues = queues
            self.id = str(uuid.uuid4())

        @property
        def physical_resource_id(self) -> str:
            return self.id

        @staticmethod
        def cloudformation_name_type() -> str:
            return ""

        @staticmethod
        def cloudformation_type() -> str:
            return "AWS::SQS::QueuePolicy"

        @classmethod
        def has_cfn_attr(cls, attr: str) -> bool:
            return attr == "Id"

        @classmethod
        def create_from_cloudformation_json(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
            from moto.sqs.models import sqs_backends

            props = cloudformation_json["Properties"]
            document = props["PolicyDocument"]
            policy = document if isinstance(document, str) else json.dumps(document)
            backend = sqs_backends[account_id][region_name]
            for url in props["Queues"]:
                backend.set_queue_attributes(url.rstrip("/").rsplit("/", 1)[-1], {"Policy": policy})
            return cls(list(props["Queues"]))

        @classmethod
        def update_from_cloudformation_json(cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name):
            return cls.create_from_cloudformation_json(new_resource_name, cloudformation_json, account_id, region_name)

        @classmethod
        def delete_from_cloudformation_json(cls, resource_name, cloudformation_json, account_id, region_name):
            from moto.sqs.models import sqs_backends

            backend = sqs_backends[account_id][region_name]
            for url in cloudformation_json["Properties"]["Queues"]:
                name = url.rstrip("/").rsplit("/", 1)[-1]
                if name in backend.queues:
                    backend.set_queue_attributes(name, {"Policy": ""})

        def is_created(self) -> bool:
            return True

    class ScheduleResource(CloudFormationModel):
        """AWS::Scheduler::Schedule over moto's Scheduler backend."""

        def __init__(self, schedule):
            self.schedule = schedule

        @property
        def physical_resource_id(self) -> str:
            return self.schedule.name

        @staticmethod
        def cloudformation_name_type() -> str:
            return "Name"

        @staticmethod
        def cloudformation_type() -> str:
            return "AWS::Scheduler::Schedule"

        @classmethod
        def has_cfn_attr(cls, attr: str) -> bool:
            return attr == "Arn"

        def get_cfn_attribute(self, attribute_name: str) -> Any:
            from moto.cloudformation.exceptions import UnformattedGetAttTemplateException

            if attribute_name == "Arn":
                return self.schedule.arn
            raise UnformattedGetAttTemplateException()

        @classmethod
        def create_from_cloudformation_json(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
            from moto.scheduler.models import scheduler_backends

            props = cloudformation_json["Properties"]
            schedule = scheduler_backends[account_id][region_name].create_schedule(
                description=props.get("Description"),
                end_date=props.get("EndDate"),
                flexible_time_window=props.get("FlexibleTimeWindow") or {"Mode": "OFF"},
                group_name=props.get("GroupName"),
                kms_key_arn=props.get("KmsKeyArn"),
                name=props.get("Name") or resource_name,
                schedule_expression=props["ScheduleExpression"],
                schedule_expression_timezone=props.get("ScheduleExpressionTimezone"),
                start_date=props.get("StartDate"),
                state=props.get("State") or "ENABLED",
                target=props["Target"],
                action_after_completion=props.get("ActionAfterCompletion"),
            )
            return cls(schedule)

        @classmethod
        def update_from_cloudformation_json(cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name):
            cls.delete_from_cloudformation_json(original_resource.schedule.name, {"Properties": {
                "GroupName": original_resource.schedule.group_name}}, account_id, region_name)
            return cls.create_from_cloudformation_json(new_resource_name, cloudformation_json, account_id, region_name)

        @classmethod
        def delete_from_cloudformation_json(cls, resource_name, cloudformation_json, account_id, region_name):
            from moto.scheduler.models import scheduler_backends

            group = (cloudformation_json.get("Properties") or {}).get("GroupName")
            scheduler_backends[account_id][region_name].delete_schedule(group, resource_name)

        def is_created(self) -> bool:
            return True

    return RolePolicy, QueuePolicy, ScheduleResource


# --------------------------------------------------------------------------------------------
# Firing a schedule
# --------------------------------------------------------------------------------------------


class FireError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def fire(account: str, region: str, name: str, scheduled_time: str, group: str | None = None) -> dict[str, Any]:
    """Invoke a schedule's target once, as EventBridge Scheduler would at `scheduled_time`."""
    from moto.events.models import events_backends
    from moto.scheduler.exceptions import ScheduleNotFound
    from moto.scheduler.models import scheduler_backends

    try:
        schedule = scheduler_backends[account][region].get_schedule(group, name)
    except ScheduleNotFound:
        raise FireError("404 Not Found", f"no schedule {name} in {account} {region}")
    if (schedule.state or "ENABLED") != "ENABLED":
        raise FireError("409 Conflict", f"schedule {name} is {schedule.state}: it does not fire")
    target = schedule.target or {}
    context = {
        "<aws.scheduler.scheduled-time>": scheduled_time,
        "<aws.scheduler.schedule-arn>": schedule.arn,
        "<aws.scheduler.execution-id>": uuid.uuid4().hex[:16],
        "<aws.scheduler.attempt-number>": "1",
    }
    detail = target.get("Input") or "{}"
    for keyword, value in context.items():
        detail = detail.replace(keyword, value)
    arn = target.get("Arn", "")
    if ":event-bus/" not in arn:
        raise FireError("400 Bad Request", f"schedule {name} targets {arn}; only event bus targets can be fired here")
    # arn:aws:events:<region>:<account>:event-bus/<name>
    bus_region, bus_account = arn.split(":")[3], arn.split(":")[4]
    parameters = target.get("EventBridgeParameters") or {}
    entry = {
        "Source": parameters.get("Source", ""),
        "DetailType": parameters.get("DetailType", ""),
        "Detail": detail,
        "EventBusName": arn,
        "Resources": [schedule.arn],
    }
    with _lock:
        entries = events_backends[bus_account][bus_region].put_events([entry])
    return {"entries": entries, "detail": json.loads(detail)}


def wrap_app(app):
    def middleware(environ, start_response):
        if environ.get("PATH_INFO") != "/amiflow-emulator/scheduler/fire" or environ.get("REQUEST_METHOD") != "POST":
            return app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        status = "200 OK"
        try:
            body = json.loads(environ["wsgi.input"].read(length) or b"{}")
            payload = fire(body["account"], body.get("region", "us-east-1"), body["name"],
                           body["scheduled_time"], body.get("group"))
        except FireError as err:
            status, payload = err.status, {"error": str(err)}
        except (KeyError, ValueError) as err:
            status, payload = "400 Bad Request", {"error": f"bad fire request: {err}"}
        data = json.dumps(payload, default=str).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return middleware


def apply() -> None:
    from moto.cloudformation import parsing
    from moto.cloudformation.models import Stack
    from moto.events.models import EventBus

    if _orig:
        return
    EventBus.physical_resource_id = property(lambda self: self.name)
    _orig["bus_create"] = EventBus.create_from_cloudformation_json
    EventBus.create_from_cloudformation_json = classmethod(_bus_create)
    _orig["create_resource_map"] = Stack._create_resource_map
    Stack._create_resource_map = _create_resource_map
    _orig["models"] = _define_models()
    # The type map is cached on first use; the new subclasses must be in it.
    parsing.get_model_map.cache_clear()
    parsing.get_name_type_map.cache_clear()
