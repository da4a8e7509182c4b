"""CloudFormation extensions: stack tags on groups, SSM parameter re-resolution on update.

What moto 5.2.5 does and what this module changes:

* Tags. moto tags EC2 resources of a stack (launch templates among them) with
  ``aws:cloudformation:stack-name`` / ``stack-id`` / ``logical-id`` only in ``ResourceMap.create``, and
  Auto Scaling groups not at all. Here groups (and launch templates added by a later update) get
  the three tags, as AWS adds them; group tags propagate at launch, as AWS's do, and are also put
  on the instances the group already launched while moto was creating it.
* ``UpdateStack`` with ``UsePreviousTemplate`` and every parameter ``UsePreviousValue``:
  - moto answered "No updates are to be performed." because it compares *resolved* values taken
    from the old stack. AWS re-reads ``AWS::SSM::Parameter::Value<...>`` parameters from Parameter
    Store on every update; so the update proceeds when a re-read value differs (and still says "No
    updates are to be performed." when nothing did).
  - moto's diff (``ResourceMap.build_resource_diff``) looks only at template text and raw parameter
    values, so a re-resolved value modified nothing. Here a resource whose template references a
    re-resolved parameter is modified. Then, for any update (moto missed this too), resources that
    read a modified resource's attributes (``Fn::GetAtt``, ``${X.Attr}`` in ``Fn::Sub``), or its ``Ref``
    when that resource type is replaced on update (launch configurations, instances), are modified
    as well, transitively; dependents come after what they read.
  - ``UsePreviousValue`` for a parameter that took its ``Default`` was a KeyError (HTTP 500) in moto.
* Launch templates updated by a stack get a new version, and, as in AWS, the *default version does
  not move* (cloudformation-coverage-roadmap#1518); a group that says
  ``Version: !GetAtt LT.LatestVersionNumber`` is then updated to the new number. moto replaced an
  updated group (delete + create under a new random name, all instances new); AWS updates it in
  place and leaves running instances alone unless an UpdatePolicy says otherwise. Here the group is
  updated in place (replaced only when ``AutoScalingGroupName`` itself changes).
* ``{{resolve:ssm:name}}`` / ``{{resolve:ssm:name:version}}`` dynamic references: moto left the
  literal text in resource properties (a launch template's ImageId became the string). Here they are
  resolved when a resource is created or modified, and, as in AWS, an update that leaves such a
  resource unchanged does not re-resolve them (cloudformation-coverage-roadmap#844).
* DescribeStacks returned the resolved AMI as ``ParameterValue`` of SSM-typed parameters; AWS returns
  the parameter name there and the value in ``ResolvedValue``.
* ``UpdateStack`` on a stack whose status ends in ``_IN_PROGRESS`` is rejected with AWS's
  ``ValidationError`` "Stack:<id> is in <status> state and can not be updated.". moto runs updates
  synchronously inside the request, so an update never leaves a stack in ``UPDATE_IN_PROGRESS``;
  only a ``CREATE_IN_PROGRESS`` stack (custom resources awaiting a response) can hit this.
* CloudFormation requests run under amiflow_shim.autoscaling's LOCK when that module is loaded,
  because stack operations create and update groups that its ticker thread also touches.
"""

from __future__ import annotations

import copy
import importlib
import re
from typing import Any

SSM_TYPE_PREFIX = "AWS::SSM::Parameter::Value<"
_DYNAMIC_SSM = re.compile(r"\{\{resolve:ssm:([^}]+)\}\}")
_SUB_REF = re.compile(r"\$\{([^!}][^}]*)\}")
# Resource types whose update replaces the physical resource (so a Ref to them changes).
_REPLACED_ON_UPDATE = {"AWS::AutoScaling::LaunchConfiguration", "AWS::EC2::Instance"}

_orig: dict[str, Any] = {}


def _stack_tags(stack_id: str, logical_id: str) -> dict[str, str]:
    # arn:aws:cloudformation:<region>:<account>:stack/<name>/<uuid>
    name = stack_id.split(":stack/", 1)[-1].split("/", 1)[0]
    return {
        "aws:cloudformation:stack-name": name,
        "aws:cloudformation:stack-id": stack_id,
        "aws:cloudformation:logical-id": logical_id,
    }


# --------------------------------------------------------------------------------------------
# Tags on groups and launch templates
# --------------------------------------------------------------------------------------------


def _group_create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
    properties = copy.deepcopy(cloudformation_json.get("Properties", {}))  # before moto mutates it
    group = _orig["asg_create"](resource_name, cloudformation_json, account_id, region_name, **kwargs)
    group.amiflow_cfn_properties = properties
    stack_id, logical_id = kwargs.get("StackId"), kwargs.get("LogicalId")
    if stack_id and logical_id:
        tags = _stack_tags(stack_id, logical_id)
        kept = [t for t in group.tags if t.get("Key") not in tags]
        group.tags = kept + [{"Key": k, "Value": v, "PropagateAtLaunch": True} for k, v in tags.items()]
        for state in group.instance_states:
            for key, value in tags.items():
                state.instance.add_tag(key, value)
    return group


def _group_update(cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name):
    from moto.autoscaling.models import autoscaling_backends

    properties = copy.deepcopy(cloudformation_json.get("Properties", {}))  # moto mutates what it is given
    explicit = properties.get("AutoScalingGroupName")
    backend = autoscaling_backends[account_id][region_name]
    if (explicit and explicit != original_resource.name) or original_resource.name not in backend.autoscaling_groups:
        # A new name means replacement, in AWS too.
        group = _orig["asg_update"](original_resource, new_resource_name, cloudformation_json, account_id, region_name)
        group.amiflow_cfn_properties = properties
        return group

    # CloudFormation sends only the properties whose resolved value changed: a group scaled by a
    # policy keeps its capacity when an unrelated property (the AMI) changes.
    previous = getattr(original_resource, "amiflow_cfn_properties", None)

    def changed(key: str) -> bool:
        return previous is None or properties.get(key) != previous.get(key)

    def pick(key: str, convert=lambda v: v) -> Any:
        value = properties.get(key)
        return convert(value) if changed(key) and value is not None else None

    source_keys = ("LaunchConfigurationName", "LaunchTemplate", "MixedInstancesPolicy")
    new_source = any(changed(k) for k in source_keys)
    zones = properties.get("VPCZoneIdentifier") if changed("VPCZoneIdentifier") else None
    backend.update_auto_scaling_group(
        name=original_resource.name,
        availability_zones=pick("AvailabilityZones") or [],
        desired_capacity=pick("DesiredCapacity", int),
        max_size=pick("MaxSize", int),
        min_size=pick("MinSize", int),
        launch_config_name=properties.get("LaunchConfigurationName") if new_source else None,
        launch_template=(properties.get("LaunchTemplate") or {}) if new_source else {},
        vpc_zone_identifier=",".join(zones) if isinstance(zones, list) else zones or None,
        health_check_period=pick("HealthCheckGracePeriod", int),
        health_check_type=pick("HealthCheckType"),
        new_instances_protected_from_scale_in=pick("NewInstancesProtectedFromScaleIn"),
        mixed_instances_policy=(copy.deepcopy(properties.get("MixedInstancesPolicy")) or None) if new_source else None,
    )
    group = backend.autoscaling_groups[original_resource.name]
    group.amiflow_cfn_properties = properties
    return group


def _template_create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
    template = _orig["lt_create"](resource_name, cloudformation_json, account_id, region_name, **kwargs)
    stack_id, logical_id = kwargs.get("StackId"), kwargs.get("LogicalId")
    if stack_id and logical_id:
        template.add_tags(_stack_tags(stack_id, logical_id))
    return template


# --------------------------------------------------------------------------------------------
# Dynamic references
# --------------------------------------------------------------------------------------------


def _resolve_dynamic(node: Any, account_id: str, region: str) -> Any:
    if isinstance(node, str):
        if "{{resolve:ssm:" not in node:
            return node

        def one(match: re.Match) -> str:
            from moto.cloudformation.exceptions import ValidationError
            from moto.ssm import ssm_backends

            reference = match.group(1)
            param = ssm_backends[account_id][region].get_parameter(reference)
            if param is None:
                raise ValidationError(message=f"Parameters: [ssm:{reference}] cannot be found.")
            return param.value

        return _DYNAMIC_SSM.sub(one, node)
    if isinstance(node, dict):
        return {k: _resolve_dynamic(v, account_id, region) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_dynamic(v, account_id, region) for v in node]
    return node


def _parse_resource(resource_json, resources_map):
    parsed = _orig["parse_resource"](resource_json, resources_map)
    if not parsed:
        return parsed
    resource_class, cleaned, resource_type = parsed
    cleaned = _resolve_dynamic(cleaned, resources_map._account_id, resources_map._region_name)
    return resource_class, cleaned, resource_type


# --------------------------------------------------------------------------------------------
# Re-resolution of SSM-typed parameters on update
# --------------------------------------------------------------------------------------------


def _ssm_changes(resource_map: Any, template: dict[str, Any], inputs: dict[str, Any]) -> set[str]:
    """Names of SSM-typed parameters whose value in Parameter Store differs from the resolved one."""
    changed = set()
    for name, slot in (template.get("Parameters") or {}).items():
        ptype = slot.get("Type", "")
        if not ptype.startswith(SSM_TYPE_PREFIX):
            continue
        key = inputs.get(name, slot.get("Default"))
        if key is None:
            continue
        try:
            fresh = resource_map.parse_ssm_parameter(key, ptype)
        except Exception:  # parameter gone: moto's own load_parameters reports it
            continue
        if fresh != resource_map.resolved_parameters.get(name):
            changed.add(name)
    return changed


def _refs(node: Any, out: dict[str, set[str]]) -> dict[str, set[str]]:
    """Collect references: out['ref'] (Ref) and out['att'] (GetAtt, ${X.Attr}) logical names."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                out["ref"].add(value)
            elif key == "Fn::GetAtt":
                if isinstance(value, list) and value and isinstance(value[0], str):
                    out["att"].add(value[0])
                elif isinstance(value, str):
                    out["att"].add(value.split(".", 1)[0])
            elif key == "Fn::Sub":
                text = value[0] if isinstance(value, list) and value else value
                if isinstance(text, str):
                    for name in _SUB_REF.findall(text):
                        (out["att"] if "." in name else out["ref"]).add(name.split(".", 1)[0])
                if isinstance(value, list) and len(value) > 1:
                    _refs(value[1], out)
            else:
                _refs(value, out)
    elif isinstance(node, list):
        for item in node:
            _refs(item, out)
    return out


def _updatable(resource_json: dict[str, Any]) -> bool:
    from moto.cloudformation.parsing import resource_class_from_type

    cls = resource_class_from_type(resource_json.get("Type", ""))
    # moto stores None for a Modify of a class without update support: never ask for that.
    return bool(cls) and not hasattr(cls.update_from_cloudformation_json, "__isabstractmethod__")


def _build_resource_diff(self, other_template, parameters=None):
    result = _orig["build_resource_diff"](self, other_template, parameters)
    inputs = parameters if parameters else self.input_parameters
    changed = _ssm_changes(self, other_template, inputs)
    if not changed and not result["Modify"]:
        return result
    old = self._resource_json_map
    new = other_template.get("Resources", {})
    modify: list[str] = list(result["Modify"])
    refs = {name: _refs(body, {"ref": set(), "att": set()}) for name, body in new.items()}

    def add(name: str) -> bool:
        if name in modify or name not in old or name not in new or not _updatable(new[name]):
            return False
        modify.append(name)
        return True

    queue = list(modify)
    for name in new:
        if refs[name]["ref"] & changed and add(name):
            queue.append(name)
    while queue:
        source = queue.pop(0)
        replaced = new[source].get("Type") in _REPLACED_ON_UPDATE
        for name in new:
            r = refs[name]
            if source in r["att"] or (replaced and source in r["ref"]):
                if add(name):
                    queue.append(name)
    result["Modify"] = modify
    return result


def _previous_inputs(stack: Any, incoming: list[dict[str, Any]]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for param in incoming:
        key = param.get("ParameterKey")
        if param.get("UsePreviousValue"):
            if key in stack.parameters:
                inputs[key] = stack.parameters[key]
        elif "ParameterValue" in param:
            inputs[key] = param["ParameterValue"]
    return inputs


def _validate_different_update(self, incoming_params, stack_body, old_stack):
    from moto.cloudformation.exceptions import ValidationError

    try:
        return _orig["validate_different_update"](self, incoming_params, stack_body, old_stack)
    except ValidationError as err:
        if "No updates are to be performed" not in (getattr(err, "message", None) or str(err)):
            raise
        template = old_stack.parse_template(stack_body)
        inputs = _previous_inputs(old_stack, incoming_params) or old_stack.resource_map.input_parameters
        if not _ssm_changes(old_stack.resource_map, template, inputs):
            raise
        return None


def _validate_status(self, stack):
    from moto.cloudformation.exceptions import ValidationError

    _orig["validate_status"](self, stack)
    if str(stack.status).endswith("_IN_PROGRESS"):
        raise ValidationError(
            stack.stack_id,
            message=f"Stack:{stack.stack_id} is in {stack.status} state and can not be updated.",
        )


def _resolve_update_parameters(self, instance, incoming_params):
    parameters = {
        p["ParameterKey"]: p["ParameterValue"] for p in incoming_params if "ParameterValue" in p
    }
    for p in incoming_params:
        key = p["ParameterKey"]
        # A parameter that took its Default has no stored value: leaving it out keeps the Default.
        if p.get("UsePreviousValue", False) and key in instance.parameters:
            parameters[key] = instance.parameters[key]
    return parameters


def _parameter_list(self):
    slots = (self.template_dict or {}).get("Parameters") or {}
    hidden = self.resource_map.no_echo_parameter_keys
    result = []
    for key, value in self.resource_map.resolved_parameters.items():
        slot = slots.get(key) or {}
        if key in hidden:
            result.append({"ParameterKey": key, "ParameterValue": "****"})
        elif str(slot.get("Type", "")).startswith("AWS::SSM::Parameter::"):
            raw = self.resource_map.input_parameters.get(key, slot.get("Default"))
            resolved = ",".join(value) if isinstance(value, list) else value
            result.append({"ParameterKey": key, "ParameterValue": raw, "ResolvedValue": resolved})
        else:
            result.append({"ParameterKey": key, "ParameterValue": value})
    return result


def _call_action(self):
    lock = None
    try:
        lock = getattr(importlib.import_module("amiflow_shim.autoscaling"), "LOCK", None)
    except ImportError:
        pass
    if lock is None:
        return _orig["call_action"](self)
    with lock:
        return _orig["call_action"](self)


def apply() -> None:
    from moto.autoscaling.models import FakeAutoScalingGroup
    from moto.cloudformation import parsing
    from moto.cloudformation.models import CloudFormationBackend, Stack
    from moto.cloudformation.responses import CloudFormationResponse
    from moto.ec2.models.launch_templates import LaunchTemplate

    if _orig:
        return
    _orig["asg_create"] = FakeAutoScalingGroup.create_from_cloudformation_json
    _orig["asg_update"] = FakeAutoScalingGroup.update_from_cloudformation_json
    _orig["lt_create"] = LaunchTemplate.create_from_cloudformation_json
    _orig["parse_resource"] = parsing.parse_resource
    _orig["build_resource_diff"] = parsing.ResourceMap.build_resource_diff
    _orig["validate_different_update"] = CloudFormationResponse._validate_different_update
    _orig["validate_status"] = CloudFormationResponse._validate_status
    _orig["call_action"] = CloudFormationResponse.call_action

    FakeAutoScalingGroup.create_from_cloudformation_json = classmethod(_group_create)
    FakeAutoScalingGroup.update_from_cloudformation_json = classmethod(_group_update)
    LaunchTemplate.create_from_cloudformation_json = classmethod(_template_create)
    # parse_resource is looked up as a module global by parse_resource_and_generate_name.
    parsing.parse_resource = _parse_resource
    parsing.ResourceMap.build_resource_diff = _build_resource_diff
    CloudFormationResponse._validate_different_update = _validate_different_update
    CloudFormationResponse._validate_status = _validate_status
    CloudFormationResponse.call_action = _call_action
    CloudFormationBackend._resolve_update_parameters = _resolve_update_parameters
    Stack.parameter_list = property(_parameter_list)
