"""Launching an Auto Scaling group's instances from one exact configuration.

What moto 5.2.5 gets wrong (FakeAutoScalingGroup.replace_autoscaling_group_instances), and why this
module replaces it rather than wrapping it:
- it takes the AMI from the group's requested launch template version but hands run_instances the
  template *without* a version, so key name, security group ids, block devices, template tags and the
  instance's `aws:ec2launchtemplate:version` tag all come from the template's default version;
- it reads user data through LaunchTemplateVersion.user_data, which asserts a Base64EncodedString,
  but CreateLaunchTemplateVersion stores the raw request string: every later group launch is a 500;
- it never resolves an ImageId of the form `resolve:ssm:<parameter>`: instances get the literal string;
- with a MixedInstancesPolicy it ignores the overrides' InstanceType and LaunchTemplateSpecification;
- DescribeAutoScalingGroups / DescribeAutoScalingInstances report every instance's template version
  as the template's *current* default version, whatever the instance was launched with.

Everything here goes through a LaunchSpec: a template plus the version as the caller requested it
(`"3"`, `"$Latest"`, `"$Default"`), optionally pinned to a resolved number, or a launch configuration.
Each launched instance remembers (attribute `amiflow_launch`) which template, requested version and
resolved version number it came from; the instance-state patches below report that.

Instances of a mixed-instances group launch as the first (highest-priority) override, as AWS's
`prioritized` on-demand allocation does while capacity lasts. An override with its own
LaunchTemplateSpecification launches from that template (AMI, version, SkipMatching key), as on AWS,
where a group can launch one instance type from a second template.
"""

from __future__ import annotations

import base64
import binascii
import copy
from dataclasses import dataclass, field, replace
from typing import Any

from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import (
    ASG_NAME_TAG,
    FakeAutoScalingGroup,
    FakeLaunchConfiguration,
    InstanceState,
)
from moto.core.exceptions import ServiceException
from moto.core.types import Base64EncodedString
from moto.ec2.models.instances import Instance
from moto.ec2.models.launch_templates import LaunchTemplate, LaunchTemplateVersion
from moto.moto_api._internal import mock_random as random

SSM_PREFIX = "resolve:ssm:"


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch: a launch template version (optionally with mixed-instances overrides) or a
    launch configuration."""

    template: LaunchTemplate | None = None
    version: str = "$Default"  # as requested; reported back on the instances
    pinned_number: int | None = None  # resolved version number, fixed by `pinned()`
    overrides: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    launch_config: FakeLaunchConfiguration | None = None
    # The first override's own template version, fixed by `pinned()` like `pinned_number`.
    override_pinned_number: int | None = None

    def launching(self) -> LaunchSpec:
        """The spec instances really launch from: the first override's own launch template when it
        names one (see module docstring), else this spec."""
        first = self.overrides[0] if self.overrides else {}
        lt = first.get("LaunchTemplateSpecification")
        if not lt or self.template is None:
            return self
        template = _find_template(self.template.ec2_backend, lt)
        return LaunchSpec(
            template=template,
            version=str(lt.get("Version") or "$Default"),
            pinned_number=self.override_pinned_number,
            overrides=self.overrides,
        )

    def template_version(self) -> LaunchTemplateVersion:
        assert self.template is not None
        return self.template.get_version(
            self.pinned_number if self.pinned_number is not None else self.version
        )

    def pinned(self) -> LaunchSpec:
        """The same spec with `$Latest` / `$Default` resolved now (an instance refresh resolves its
        target once, when it starts replacing instances)."""
        if self.template is None:
            return self
        launching = self.launching()
        return replace(
            self,
            pinned_number=self.template_version().number,
            override_pinned_number=(
                launching.template_version().number if launching is not self else None
            ),
        )

    def key(self) -> tuple[str, str, int] | tuple[str, str]:
        """What SkipMatching compares: template id and resolved version of the template instances
        launch from, or the LC name."""
        launching = self.launching()
        if launching.template is not None:
            return ("lt", launching.template.id, launching.template_version().number)
        assert self.launch_config is not None
        return ("lc", self.launch_config.name)


def instance_key(instance: Instance) -> tuple[Any, ...] | None:
    """The LaunchSpec.key() an instance was launched with (None if unknown)."""
    rec = getattr(instance, "amiflow_launch", None)
    if rec is not None:
        if "template_id" in rec:
            return ("lt", rec["template_id"], rec["version_number"])
        return ("lc", rec.get("launch_configuration_name"))
    # Launched by something other than this module: fall back on EC2's own template tags.
    tags = {t["key"]: t["value"] for t in instance.get_tags()} if hasattr(instance, "get_tags") else {}
    if "aws:ec2launchtemplate:id" in tags:
        return ("lt", tags["aws:ec2launchtemplate:id"], int(tags["aws:ec2launchtemplate:version"]))
    return None


def _mixed_overrides(policy: dict[str, Any] | None) -> tuple[dict[str, Any], ...]:
    if not policy:
        return ()
    return tuple((policy.get("LaunchTemplate") or {}).get("Overrides") or [])


def spec_from_group(group: FakeAutoScalingGroup) -> LaunchSpec:
    """The group's current configuration ($Latest / $Default left unresolved)."""
    if group.ec2_launch_template is not None:
        return LaunchSpec(
            template=group.ec2_launch_template,
            version=str(group.launch_template_version or "$Default"),
            overrides=_mixed_overrides(group.mixed_instances_policy),
        )
    return LaunchSpec(launch_config=group.launch_config)


def _find_template(ec2_backend: Any, spec: dict[str, Any]) -> LaunchTemplate:
    template_id = spec.get("LaunchTemplateId")
    template_name = spec.get("LaunchTemplateName")
    if bool(template_id) == bool(template_name):
        raise ValidationError(
            "Valid requests must contain either launchTemplateId or LaunchTemplateName"
        )
    try:
        if template_id:
            return ec2_backend.get_launch_template(template_id)
        return ec2_backend.get_launch_template_by_name(template_name)
    except ServiceException:
        # moto raises EC2's error; Auto Scaling answers with its own ValidationError.
        what = f"ID '{template_id}'" if template_id else f"name '{template_name}'"
        raise ValidationError(
            f"You must use a valid fully-formed launch template. The specified launch template, "
            f"with template {what}, does not exist."
        )


def spec_from_configuration(ec2_backend: Any, desired: dict[str, Any]) -> LaunchSpec:
    """A LaunchSpec for an instance refresh's DesiredConfiguration (validated like AWS does)."""
    lt = desired.get("LaunchTemplate")
    mixed = desired.get("MixedInstancesPolicy")
    if lt and mixed:
        raise ValidationError(
            "Valid requests must contain either LaunchTemplate or MixedInstancesPolicy parameter."
        )
    if mixed:
        lt = (mixed.get("LaunchTemplate") or {}).get("LaunchTemplateSpecification")
        if not lt:
            raise ValidationError(
                "The request must contain the parameter "
                "MixedInstancesPolicy.LaunchTemplate.LaunchTemplateSpecification"
            )
    if not lt:
        raise ValidationError(
            "A DesiredConfiguration must contain a LaunchTemplate or a MixedInstancesPolicy."
        )
    template = _find_template(ec2_backend, lt)
    spec = LaunchSpec(
        template=template,
        version=str(lt.get("Version") or "$Default"),
        overrides=_mixed_overrides(mixed),
    )
    try:
        spec.template_version()
    except (ServiceException, ValueError):
        raise ValidationError(
            f"You must use a valid fully-formed launch template. The launch template version "
            f"'{spec.version}' of {template.id} does not exist."
        )
    return spec


def resolve_image_id(group: FakeAutoScalingGroup, image_id: str | None) -> str | None:
    """`resolve:ssm:<name>[:version|:label]` -> the AMI id in that parameter of the group's account."""
    if not image_id or not image_id.startswith(SSM_PREFIX):
        return image_id
    from moto.ssm.models import ssm_backends

    name = image_id[len(SSM_PREFIX):]
    try:
        param = ssm_backends[group.account_id][group.region].get_parameter(name)
    except ServiceException:
        param = None
    if param is None:
        raise ValidationError(
            f"Unable to resolve the image id {image_id}: the SSM parameter {name} does not exist."
        )
    return param.value


def _user_data(value: Any) -> Base64EncodedString | None:
    """Launch template user data as moto's instances expect it (see module docstring)."""
    if value is None or isinstance(value, Base64EncodedString):
        return value
    if isinstance(value, bytes):
        value = value.decode()
    try:
        base64.b64decode(value, validate=True)
        return Base64EncodedString(value)
    except (binascii.Error, ValueError):
        return Base64EncodedString(base64.b64encode(value.encode()).decode())


def launch(
    group: FakeAutoScalingGroup,
    spec: LaunchSpec,
    count: int,
    propagated_tags: dict[str, str] | None = None,
) -> list[Instance]:
    """Launch `count` instances for `group` from `spec` and add them to the group InService."""
    if count <= 0:
        return []
    ec2 = group.autoscaling_backend.ec2_backend
    tags = dict(group.get_propagated_tags() if propagated_tags is None else propagated_tags)
    tags[ASG_NAME_TAG] = group.name
    subnet_id = group.vpc_zone_identifier.split(",")[0] if group.vpc_zone_identifier else None

    spec = spec.launching()
    if spec.template is not None:
        version = spec.template_version()
        data = version.data
        first = spec.overrides[0] if spec.overrides else {}
        image_id = first.get("ImageId") or data.get("ImageId")
        # An LT without InstanceType cannot launch on AWS; moto's own default keeps going.
        instance_type = first.get("InstanceType") or data.get("InstanceType") or "m1.small"
        tags.update(version.instance_tags)
        user_data = _user_data(data.get("UserData"))
        security_groups = list(data.get("SecurityGroups") or [])
        extra = {
            # The version number is what makes run_instances read key name, security group ids,
            # block devices and template tags from the right version.
            "launch_template": {"LaunchTemplateId": spec.template.id, "Version": str(version.number)},
            "launch_config": None,
            "associate_public_ip": None,
        }
        record = {
            "template_id": spec.template.id,
            "template_name": spec.template.name,
            "version": spec.version,
            "version_number": version.number,
            "image_id": None,
        }
    else:
        lc = spec.launch_config
        assert lc is not None
        image_id = lc.image_id
        instance_type = lc.instance_type
        user_data = lc.user_data
        security_groups = list(lc.security_groups or [])
        extra = {
            "launch_template": None,
            "launch_config": lc,
            "associate_public_ip": lc.associate_public_ip_address,
        }
        record = {"launch_configuration_name": lc.name, "image_id": None}

    image_id = resolve_image_id(group, image_id)
    record["image_id"] = image_id
    reservation = ec2.run_instances(
        image_id,
        count,
        user_data,
        security_groups,
        instance_type=instance_type,
        tags={"instance": tags},
        placement=random.choice(group.availability_zones),
        is_instance_type_default=False,
        subnet_id=subnet_id,
        **extra,
    )
    for instance in reservation.instances:
        instance.autoscaling_group = group  # type: ignore[attr-defined]
        instance.amiflow_launch = dict(record)  # type: ignore[attr-defined]
        group.instance_states.append(
            InstanceState(
                instance, protected_from_scale_in=group.new_instances_protected_from_scale_in
            )
        )
    return list(reservation.instances)


def terminate(group: FakeAutoScalingGroup, instance_ids: list[str]) -> None:
    """Take instances out of the group and terminate them, without the relaunch that the EC2
    TerminateInstances *handler* would trigger (the backend call does not)."""
    if not instance_ids:
        return
    wanted = set(instance_ids)
    group.instance_states = [s for s in group.instance_states if s.instance.id not in wanted]
    group.autoscaling_backend.ec2_backend.terminate_instances(list(instance_ids))


def replace_instances(group: FakeAutoScalingGroup, instance_ids: list[str], spec: LaunchSpec) -> list[str]:
    """Terminate these instances of the group and launch as many from `spec`; returns the new ids."""
    present = {s.instance.id for s in group.instance_states}
    ids = [i for i in instance_ids if i in present]
    if not ids:
        return []
    # Launch first: a launch that fails (e.g. a deleted SSM parameter) then leaves the group whole.
    new = [i.id for i in launch(group, spec, len(ids))]
    terminate(group, ids)
    return new


def set_group_configuration(group: FakeAutoScalingGroup, desired: dict[str, Any]) -> None:
    """Point the group at a DesiredConfiguration exactly as it was given (what AWS does when an
    instance refresh with a desired configuration succeeds)."""
    if desired.get("MixedInstancesPolicy"):
        policy = copy.deepcopy(desired["MixedInstancesPolicy"])
        policy.setdefault(
            "InstancesDistribution",
            {
                "OnDemandAllocationStrategy": "prioritized",
                "OnDemandBaseCapacity": 0,
                "OnDemandPercentageAboveBaseCapacity": 100,
                "SpotAllocationStrategy": "lowest-price",
                "SpotInstancePools": 2,
            },
        )
        group.mixed_instances_policy = policy
        group._set_launch_configuration(None, {}, policy)  # type: ignore[arg-type]
    else:
        group.mixed_instances_policy = None
        group._set_launch_configuration(None, copy.deepcopy(desired["LaunchTemplate"]), None)  # type: ignore[arg-type]
    group.launch_config = None  # type: ignore[assignment]
    group.launch_configuration_name = None


# --- patches on moto's classes -------------------------------------------------------------------

_ORIGINAL: dict[str, Any] = {}


def _replace_autoscaling_group_instances(
    self: FakeAutoScalingGroup, count_needed: int, propagated_tags: dict[str, str]
) -> None:
    launch(self, spec_from_group(self), count_needed, propagated_tags)


def _instance_state_launch_template(self: InstanceState) -> dict[str, Any] | None:
    rec = getattr(self.instance, "amiflow_launch", None)
    if rec is None:
        return _ORIGINAL["InstanceState.launch_template"](self)
    if "template_id" not in rec:
        return None
    return {
        "LaunchTemplateId": rec["template_id"],
        "LaunchTemplateName": rec["template_name"],
        "Version": rec["version"],
    }


def _instance_state_launch_configuration_name(self: InstanceState) -> str | None:
    rec = getattr(self.instance, "amiflow_launch", None)
    if rec is None:
        return _ORIGINAL["InstanceState.launch_configuration_name"](self)
    return rec.get("launch_configuration_name")


def _group_launch_template(self: FakeAutoScalingGroup) -> dict[str, Any] | None:
    # A group with a MixedInstancesPolicy reports its template only inside the policy (as AWS does);
    # moto would also report a stale top-level LaunchTemplate after a switch to a mixed policy.
    if self.mixed_instances_policy:
        return None
    return _ORIGINAL["FakeAutoScalingGroup.launch_template"](self)


def _group_update(self: FakeAutoScalingGroup, *args: Any, **kwargs: Any) -> None:
    launch_config_name = kwargs.get("launch_config_name")
    launch_template = kwargs.get("launch_template")
    mixed = kwargs.get("mixed_instances_policy")
    if not (launch_config_name or launch_template or mixed):
        # moto assigns the (absent) MixedInstancesPolicy unconditionally, deleting the group's
        # policy; AWS leaves a group's launch source alone when the update names none. Hand the
        # policy back in, with the template named by id only: moto stored it with both id and name,
        # which its own validation would reject.
        if self.mixed_instances_policy:
            policy = copy.deepcopy(self.mixed_instances_policy)
            spec = policy["LaunchTemplate"]["LaunchTemplateSpecification"]
            spec.pop("LaunchTemplateName", None)
            kwargs["mixed_instances_policy"] = policy
    elif launch_config_name:
        # Switching to a launch configuration: moto would keep using the old template.
        self.ec2_launch_template = None
        kwargs["mixed_instances_policy"] = None
    elif launch_template or mixed:
        # Switching to a template: moto would keep reporting the old launch configuration.
        self.launch_config = None  # type: ignore[assignment]
        self.launch_configuration_name = None
    _ORIGINAL["FakeAutoScalingGroup.update"](self, *args, **kwargs)


def apply() -> None:
    if _ORIGINAL:
        return
    _ORIGINAL["InstanceState.launch_template"] = InstanceState.launch_template.fget  # type: ignore[attr-defined]
    _ORIGINAL["InstanceState.launch_configuration_name"] = InstanceState.launch_configuration_name.fget  # type: ignore[attr-defined]
    _ORIGINAL["FakeAutoScalingGroup.launch_template"] = FakeAutoScalingGroup.launch_template.fget  # type: ignore[attr-defined]
    _ORIGINAL["FakeAutoScalingGroup.update"] = FakeAutoScalingGroup.update
    FakeAutoScalingGroup.replace_autoscaling_group_instances = _replace_autoscaling_group_instances  # type: ignore[method-assign]
    FakeAutoScalingGroup.update = _group_update  # type: ignore[method-assign]
    FakeAutoScalingGroup.launch_template = property(_group_launch_template)  # type: ignore[method-assign,assignment]
    InstanceState.launch_template = property(_instance_state_launch_template)  # type: ignore[method-assign,assignment]
    InstanceState.launch_configuration_name = property(_instance_state_launch_configuration_name)  # type: ignore[method-assign,assignment]
