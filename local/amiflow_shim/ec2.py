"""EC2 extensions: shared AMIs, snapshot permissions, AMI creation dates, launch template versions.

What moto 5.2.5 gets wrong (see shared/EMULATOR.md) and what this module does about it:

* Shared AMIs. ``AmiBackend.describe_images`` only looks at the caller's own backend, so an AMI that
  account A shares with B (launch permission ``UserId=B`` or ``Group=all``) is ``InvalidAMIID.NotFound``
  in B. The same method backs DescribeImages, the RunInstances AMI check and the ``Instance``
  constructor (which is also how Auto Scaling launches), so one wrapper fixes all of them: it adds the
  same-region AMIs of other accounts that grant this account. Only the owner may change or read the
  launch permissions of an AMI (moto would let B edit A's AMI once B can "see" it).
* Snapshot ``createVolumePermission``: moto only understands the old ``OperationType``/``UserIds``
  form of ModifySnapshotAttribute; the ``CreateVolumePermission={'Add': [...], 'Remove': [...]}`` form
  (what SDKs send by default) was silently ignored.
* Creation dates (EMULATOR-ONLY HOOK): CreateImage and RegisterImage take the image tag
  ``amiflow:emulator-creation-date`` (ISO 8601, given in ``TagSpecifications`` for the ``image``
  resource) as the image's ``CreationDate``, so a local world can hold a realistic monthly history
  of AMIs. The tag stays on the image. Real AWS has no such hook; never rely on it outside the emulator.
  RegisterImage in moto ignores ``TagSpecifications`` altogether; it is honoured here. CreateImage
  in moto raises NotImplementedError for ``snapshot`` tag specifications; here they tag the snapshot.
* Launch template versions: ``CreateLaunchTemplateVersion`` with ``SourceVersion`` starts from a
  deep copy of the source version's data (moto kept only the overrides) and parses ``UserData``
  (moto stored the raw string, which later crashed Auto Scaling launches with a 500).
  ``DescribeLaunchTemplateVersions`` honours ``Versions``, ``MinVersion``/``MaxVersion``, ``Filters``
  and pages with ``MaxResults``/``NextToken`` (moto ignored filters and silently capped at 15);
  versions come newest first, as AWS returns them. ``DeleteLaunchTemplateVersions`` is added.
  ``CreateLaunchTemplateVersion`` honours ``ClientToken`` (moto ignored it): the same token with the
  same request returns the version the first call made, with another request
  ``IdempotentParameterMismatch``.
* Deprecation: moto has no ``EnableImageDeprecation``. Here the owner may set an AMI's
  ``DeprecateAt`` (in the future, at most 10 years ahead, rounded up to the minute, as AWS does);
  DescribeImages then returns it as ``DeprecationTime``. Deprecated AMIs still launch by id and
  are not hidden from listings here (AWS hides them from listings by others).
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

CREATION_DATE_TAG = "amiflow:emulator-creation-date"

_lock = threading.RLock()
# CreateLaunchTemplateVersion's idempotency tokens: (account, token) -> (template id, request, version).
_version_tokens: dict[tuple[str, str], tuple[str, str, Any]] = {}
_orig: dict[str, Any] = {}


def _parse_creation_date(value: str) -> datetime:
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        from moto.ec2.exceptions import EC2ClientError

        raise EC2ClientError(
            "InvalidParameterValue",
            f"Value ({value}) for tag {CREATION_DATE_TAG} is not an ISO 8601 date-time (emulator-only hook)",
        )
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    # moto keeps naive UTC datetimes (moto.core.utils.utcnow); do the same so they serialize alike.
    return parsed


def _apply_creation_date(ami: Any, tags: list[dict[str, str]]) -> None:
    for tag in tags:
        if tag.get("Key") == CREATION_DATE_TAG:
            ami.creation_date = _parse_creation_date(tag.get("Value", ""))


def _split_tag_specs(tag_specifications: list[dict[str, Any]] | None) -> tuple[list, list]:
    image_tags: list[dict[str, str]] = []
    snapshot_tags: list[dict[str, str]] = []
    for spec in tag_specifications or []:
        rtype = spec.get("ResourceType")
        if rtype == "image":
            image_tags += spec.get("Tags", [])
        elif rtype == "snapshot":
            snapshot_tags += spec.get("Tags", [])
        else:
            from moto.ec2.exceptions import InvalidTaggableResourceType

            raise InvalidTaggableResourceType(rtype)
    return image_tags, snapshot_tags


# --------------------------------------------------------------------------------------------
# Shared AMIs
# --------------------------------------------------------------------------------------------


def _grants(ami: Any, account_id: str) -> bool:
    for perm in ami.launch_permissions:
        if perm.get("Group") == "all" or perm.get("UserId") == account_id:
            return True
    return False


def _shared_images(backend: Any) -> list[Any]:
    """Same-region AMIs owned by other accounts that grant ``backend``'s account a launch permission."""
    from moto.ec2.models import ec2_backends

    me = backend.account_id
    region = backend.region_name
    own = backend.amis
    found: dict[str, Any] = {}
    # Reading ec2_backends[account] creates that account: iterate a snapshot and use .get only.
    for account_id, regions in list(ec2_backends.items()):
        if account_id == me:
            continue
        other = regions.get(region)
        if other is None:
            continue
        for ami in list(other.amis.values()):
            # moto loads the same public Amazon AMIs into every account: the caller's copy wins.
            if ami.id in own or ami.id in found:
                continue
            if ami.state == "disabled":
                continue
            if _grants(ami, me):
                found[ami.id] = ami
    return list(found.values())


def _describe_images(self, ami_ids=None, filters=None, exec_users=None, owners=None):
    from moto.ec2.exceptions import InvalidAMIIdError
    from moto.ec2.utils import generic_filter

    orig = _orig["describe_images"]
    shared = _shared_images(self)
    if not shared:
        return orig(self, ami_ids=ami_ids, filters=filters, exec_users=exec_users, owners=owners)

    if ami_ids:
        extra = [ami for ami in shared if ami.id in ami_ids]
        try:
            own = orig(self, ami_ids=ami_ids, filters=filters, exec_users=exec_users, owners=owners)
        except InvalidAMIIdError:
            if not extra:
                raise
            own = []
        return list(own) + extra

    own = orig(self, ami_ids=ami_ids, filters=filters, exec_users=exec_users, owners=owners)
    extra = shared
    me = self.account_id
    if exec_users:
        users = {me if u == "self" else u for u in exec_users}
        extra = [
            ami
            for ami in extra
            if ami.is_public or any(p.get("UserId") in users for p in ami.launch_permissions)
        ]
    if owners:
        wanted = {me if o == "self" else o for o in owners}
        extra = [ami for ami in extra if ami.owner_id in wanted or ami.owner_alias in wanted]
    if filters:
        extra = generic_filter(filters, extra)
    return list(own) + list(extra)


def _not_owner(self, ami_id: str) -> None:
    """Only the owner may read or change an AMI's attributes (B must not edit A's shared AMI)."""
    from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError

    if ami_id in self.amis:
        return
    if any(ami.id == ami_id for ami in _shared_images(self)):
        raise EC2ClientError("AuthFailure", f"Not authorized for image:{ami_id}")
    raise InvalidAMIIdError(ami_id)


def _modify_image_attribute(self, ami_id, launch_permissions_to_add, launch_permissions_to_remove):
    _not_owner(self, ami_id)
    return _orig["modify_image_attribute"](
        self,
        ami_id=ami_id,
        launch_permissions_to_add=launch_permissions_to_add,
        launch_permissions_to_remove=launch_permissions_to_remove,
    )


def _describe_image_attribute(self, ami_id, attribute_name):
    # moto indexes self.amis directly: an unknown or shared id was a KeyError (HTTP 500).
    _not_owner(self, ami_id)
    return _orig["describe_image_attribute"](self, ami_id, attribute_name)


def _enable_image_deprecation(self):
    """EnableImageDeprecation: the owner sets when the AMI is deprecated (moto lacks the action)."""
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError

    ami_id = self._get_param("ImageId")
    at = self._get_param("DeprecateAt")
    self.error_on_dryrun()
    _not_owner(self.ec2_backend, ami_id)
    when = datetime.fromisoformat(str(at).replace("Z", "+00:00")) if not isinstance(at, datetime) else at
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = datetime.now(timezone.utc)
    if when <= now:
        raise EC2ClientError("InvalidParameterValue", f"DeprecateAt {at}: the deprecation time must be in the future")
    if when.year > now.year + 10:
        raise EC2ClientError("InvalidParameterValue", f"DeprecateAt {at}: at most 10 years from now")
    if when.second or when.microsecond:
        when = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
    self.ec2_backend.amis[ami_id].deprecation_time = when.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return ActionResult({"Return": True})


# --------------------------------------------------------------------------------------------
# CreateImage / RegisterImage: tags and creation dates
# --------------------------------------------------------------------------------------------


def _create_image(self, instance_id, name, description, tag_specifications):
    image_tags, snapshot_tags = _split_tag_specs(tag_specifications)
    # Hand moto only the image tags: it raises NotImplementedError on snapshot tag specifications.
    spec = [{"ResourceType": "image", "Tags": image_tags}] if image_tags else []
    ami = _orig["create_image"](self, instance_id, name, description, tag_specifications=spec)
    for tag in snapshot_tags:
        ami.ebs_snapshot.add_tag(tag["Key"], tag["Value"])
    _apply_creation_date(ami, image_tags)
    return ami


def _register_image_response(self):
    """RegisterImage, honouring TagSpecifications (moto drops them) and a few descriptive fields."""
    from moto.core.responses import ActionResult

    name = self._get_param("Name")
    description = self._get_param("Description", "")
    image_tags, snapshot_tags = _split_tag_specs(self._get_param("TagSpecifications", []))
    self.error_on_dryrun()
    if image_tags:
        _parse_creation_date_checked(image_tags)
    image = self.ec2_backend.register_image(name, description)
    for attr, param in (
        ("architecture", "Architecture"),
        ("virtualization_type", "VirtualizationType"),
        ("root_device_name", "RootDeviceName"),
        ("boot_mode", "BootMode"),
    ):
        value = self._get_param(param)
        if value:
            setattr(image, attr, value)
    if self._get_param("BlockDeviceMappings"):
        image.root_device_type = "ebs"
    for tag in image_tags:
        image.add_tag(tag["Key"], tag["Value"])
    for tag in snapshot_tags:
        image.ebs_snapshot.add_tag(tag["Key"], tag["Value"])
    _apply_creation_date(image, image_tags)
    return ActionResult({"ImageId": image.id})


def _parse_creation_date_checked(tags: list[dict[str, str]]) -> None:
    # Validate before anything is created, so a bad date leaves no half-made image behind.
    for tag in tags:
        if tag.get("Key") == CREATION_DATE_TAG:
            _parse_creation_date(tag.get("Value", ""))


# --------------------------------------------------------------------------------------------
# Snapshot createVolumePermission
# --------------------------------------------------------------------------------------------


def _modify_snapshot_attribute_response(self):
    from moto.core.responses import EmptyResult

    snapshot_id = self._get_param("SnapshotId")
    operation_type = self._get_param("OperationType")
    groups = self._get_param("GroupNames", [])
    user_ids = self._get_param("UserIds", [])
    modifications = self._get_param("CreateVolumePermission", {}) or {}

    self.error_on_dryrun()

    backend = self.ec2_backend
    if operation_type == "add":
        backend.add_create_volume_permission(snapshot_id, user_ids=user_ids, groups=groups)
    elif operation_type == "remove":
        backend.remove_create_volume_permission(snapshot_id, user_ids=user_ids, groups=groups)

    for key, call in (("Add", backend.add_create_volume_permission), ("Remove", backend.remove_create_volume_permission)):
        perms = modifications.get(key) or []
        add_users = [p["UserId"] for p in perms if p.get("UserId")]
        add_groups = [p["Group"] for p in perms if p.get("Group")]
        if add_users or add_groups:
            call(snapshot_id, user_ids=add_users, groups=add_groups)
    return EmptyResult()


# --------------------------------------------------------------------------------------------
# Launch template versions
# --------------------------------------------------------------------------------------------


def _live_versions(template: Any) -> list[Any]:
    return [v for v in template.versions if not getattr(v, "amiflow_deleted", False)]


def _get_version(self, num):
    """LaunchTemplate.get_version that knows deleted versions and rejects 0 / negative numbers.

    moto indexes ``self.versions[int(num) - 1]``, so version "0" silently meant the latest one.
    """
    from moto.ec2.exceptions import InvalidLaunchTemplateVersionNotFound

    text = str(num).lower()
    if text == "$latest":
        return _live_versions(self)[-1]
    if text == "$default":
        return self.default_version()
    try:
        number = int(num)
    except (TypeError, ValueError):
        raise InvalidLaunchTemplateVersionNotFound(template_id=self.id, version=num)
    if number < 1 or number > len(self.versions) or getattr(self.versions[number - 1], "amiflow_deleted", False):
        raise InvalidLaunchTemplateVersionNotFound(template_id=self.id, version=num)
    return self.versions[number - 1]


def _latest_version(self):
    return _live_versions(self)[-1]


def _template_from_request(resp) -> Any:
    name = resp._get_param("LaunchTemplateName")
    tmpl_id = resp._get_param("LaunchTemplateId")
    if tmpl_id:
        return resp.ec2_backend.get_launch_template(tmpl_id)
    if name:
        return resp.ec2_backend.get_launch_template_by_name(name)
    from moto.ec2.exceptions import MissingParameterError

    raise MissingParameterError("launch template ID or launch template name")


def _version_result(resp, template, version) -> dict[str, Any]:
    return {
        "CreateTime": version.create_time,
        "CreatedBy": f"arn:{resp.partition}:iam::{resp.current_account}:root",
        "DefaultVersion": template.is_default(version),
        "LaunchTemplateData": version.data,
        "LaunchTemplateId": template.id,
        "LaunchTemplateName": template.name,
        "VersionDescription": version.description,
        "VersionNumber": version.number,
    }


def _create_launch_template_version(self):
    from moto.core.responses import ActionResult
    from moto.ec2.utils import parse_user_data

    template = _template_from_request(self)
    version_description = self._get_param("VersionDescription")
    source_version = self._get_param("SourceVersion")
    overrides = self._get_param("LaunchTemplateData", {}) or {}
    if "UserData" in overrides:
        # moto's CreateLaunchTemplate parses UserData; its CreateLaunchTemplateVersion did not.
        overrides["UserData"] = parse_user_data(overrides["UserData"])

    self.error_on_dryrun()

    token = self._get_param("ClientToken")
    asked = json.dumps([source_version, version_description, overrides], sort_keys=True, default=str)
    with _lock:
        if token:
            seen = _version_tokens.get((self.current_account, token))
            if seen is not None:
                # AWS: the same token with the same request returns the version made the first
                # time (a retry whose reply was lost); with another request, it is refused.
                if seen[0] != template.id or seen[1] != asked:
                    from moto.ec2.exceptions import EC2ClientError

                    raise EC2ClientError(
                        "IdempotentParameterMismatch",
                        f"Client token {token} was used with a different request.",
                    )
                return ActionResult({"LaunchTemplateVersion": _version_result(self, template, seen[2])})
        if source_version:
            data = copy.deepcopy(template.get_version(source_version).data)
            # AWS: the new version inherits every launch parameter of the source version, except
            # the top-level parameters given in LaunchTemplateData.
            data.update(overrides)
        else:
            data = overrides
        version = template.create_version(data, version_description)
        if token:
            _version_tokens[(self.current_account, token)] = (template.id, asked, version)
    return ActionResult({"LaunchTemplateVersion": _version_result(self, template, version)})


_FILTER_FIELDS = {
    "image-id": lambda v: v.data.get("ImageId"),
    "instance-type": lambda v: v.data.get("InstanceType"),
    "kernel-id": lambda v: v.data.get("KernelId"),
    "ram-disk-id": lambda v: v.data.get("RamDiskId"),
    "ebs-optimized": lambda v: v.data.get("EbsOptimized"),
    "is-default-version": lambda v: v.template.is_default(v),
    "iam-instance-profile": lambda v: (v.data.get("IamInstanceProfile") or {}).get("Arn")
    or (v.data.get("IamInstanceProfile") or {}).get("Name"),
}


def _matches(version: Any, filters: dict[str, list[str]]) -> bool:
    import fnmatch

    from moto.ec2.exceptions import FilterNotImplementedError

    for name, values in filters.items():
        getter = _FILTER_FIELDS.get(name)
        if getter is None:
            raise FilterNotImplementedError(name, "DescribeLaunchTemplateVersions")
        value = getter(version)
        if isinstance(value, bool):
            value = str(value).lower()
        if value is None:
            return False
        if not any(fnmatch.fnmatchcase(str(value), pattern) for pattern in values):
            return False
    return True


def _encode_token(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True).encode()).decode()


def _decode_token(token: str) -> dict[str, Any]:
    from moto.ec2.exceptions import EC2ClientError

    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()).decode())
    except Exception:
        raise EC2ClientError("InvalidNextToken", "The token is not valid")


def _describe_launch_template_versions(self):
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError, InvalidParameterValue, MissingParameter

    name = self._get_param("LaunchTemplateName")
    template_id = self._get_param("LaunchTemplateId")
    versions = self._get_param("Versions", []) or []
    min_version = self._get_int_param("MinVersion")
    max_version = self._get_int_param("MaxVersion")
    max_results = self._get_int_param("MaxResults")
    next_token = self._get_param("NextToken")
    filters = self._filters_from_querystring()

    self.error_on_dryrun()

    if max_results is not None and not 1 <= max_results <= 200:
        raise EC2ClientError(
            "InvalidParameterValue",
            f"Value ( {max_results} ) for parameter maxResults is invalid. Parameter must be between 1 and 200.",
        )

    with _lock:
        pairs: list[tuple[Any, Any]] = []
        if name or template_id:
            template = (
                self.ec2_backend.get_launch_template(template_id)
                if template_id
                else self.ec2_backend.get_launch_template_by_name(name)
            )
            if versions:
                seen = set()
                for v in versions:
                    version = template.get_version(v)
                    if version.number not in seen:
                        seen.add(version.number)
                        pairs.append((template, version))
            else:
                pairs = [(template, v) for v in _live_versions(template)]
            if min_version is not None:
                pairs = [p for p in pairs if p[1].number >= min_version]
            if max_version is not None:
                pairs = [p for p in pairs if p[1].number <= max_version]
            # AWS lists a template's versions newest first.
            pairs.sort(key=lambda p: p[1].number, reverse=True)
        else:
            wrong = (
                "To describe the launch template data for all your launch templates, for '--versions' "
                "specify '$Latest', '$Default', or both, and omit '--launch-template-id', "
                "'--launch-template-name', and version numbers."
            )
            if not versions:
                raise MissingParameter(wrong)
            lowered = {v.lower() for v in versions}
            if not lowered <= {"$latest", "$default"}:
                raise InvalidParameterValue(wrong)
            for template in list(self.ec2_backend.launch_templates.values()):
                picked = []
                if "$latest" in lowered:
                    picked.append(template.get_version("$Latest"))
                if "$default" in lowered:
                    default = template.get_version("$Default")
                    if default not in picked:
                        picked.append(default)
                pairs += [(template, v) for v in picked]

        if filters:
            pairs = [p for p in pairs if _matches(p[1], filters)]

        start = 0
        request_key = json.dumps(
            [name, template_id, versions, min_version, max_version, sorted(filters.items())], sort_keys=True
        )
        if next_token:
            token = _decode_token(next_token)
            if token.get("k") != request_key:
                raise EC2ClientError("InvalidNextToken", "The token is not valid for this request")
            start = int(token.get("o", 0))
        page = pairs[start:] if max_results is None else pairs[start : start + max_results]
        end = start + len(page)
        result: dict[str, Any] = {
            "LaunchTemplateVersions": [_version_result(self, t, v) for t, v in page]
        }
        if end < len(pairs):
            result["NextToken"] = _encode_token({"k": request_key, "o": end})
    return ActionResult(result)


def _delete_launch_template_versions(self):
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError

    versions = self._get_param("Versions", []) or []
    self.error_on_dryrun()
    if not versions:
        raise EC2ClientError("MissingParameter", "The request must contain the parameter launchTemplateVersion")
    template = _template_from_request(self)
    done, failed = [], []
    with _lock:
        for raw in versions:
            base = {"LaunchTemplateId": template.id, "LaunchTemplateName": template.name}
            try:
                number = int(raw)
            except (TypeError, ValueError):
                failed.append(dict(base, ResponseError={"Code": "launchTemplateVersionDoesNotExist",
                                                         "Message": f"The version {raw} does not exist"}))
                continue
            base["VersionNumber"] = number
            if number < 1 or number > len(template.versions) or getattr(
                template.versions[number - 1], "amiflow_deleted", False
            ):
                failed.append(dict(base, ResponseError={"Code": "launchTemplateVersionDoesNotExist",
                                                         "Message": "The specified launch template version does not exist"}))
                continue
            if number == template.default_version_number:
                failed.append(dict(base, ResponseError={"Code": "unexpectedError",
                                                         "Message": "Cannot delete the default version of a launch template"}))
                continue
            # Versions live in a list indexed by number - 1 (moto), so mark instead of removing;
            # version numbers are never reused, as in AWS.
            template.versions[number - 1].amiflow_deleted = True
            done.append(base)
    return ActionResult(
        {
            "SuccessfullyDeletedLaunchTemplateVersions": done,
            "UnsuccessfullyDeletedLaunchTemplateVersions": failed,
        }
    )


def _modify_launch_template(self, default_version, template_name=None, template_id=None):
    from moto.ec2.exceptions import InvalidLaunchTemplateVersionNotFound

    template = _lookup_template(self, template_name, template_id)
    if template is not None:
        try:
            number = int(default_version)
        except (TypeError, ValueError):
            number = None
        if number is not None and 1 <= number <= len(template.versions) and getattr(
            template.versions[number - 1], "amiflow_deleted", False
        ):
            raise InvalidLaunchTemplateVersionNotFound(version=default_version)
    return _orig["modify_launch_template"](
        self, default_version=str(default_version), template_name=template_name, template_id=template_id
    )


def _lookup_template(self, template_name, template_id):
    if template_name:
        template_id = self.launch_template_name_to_ids.get(template_name)
    return self.launch_templates.get(template_id) if template_id else None


def _launch_template_tags(self):
    # moto copies the tags into LaunchTemplate.tags once, in __init__, so tags added later
    # (CreateTags, or CloudFormation's aws:cloudformation:* tags) never showed in DescribeLaunchTemplates.
    return [{"Key": t["key"], "Value": t["value"]} for t in self.get_tags()]


def apply() -> None:
    from moto.ec2.models.amis import AmiBackend
    from moto.ec2.models.launch_templates import LaunchTemplate, LaunchTemplateBackend
    from moto.ec2.responses.amis import AmisResponse
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore
    from moto.ec2.responses.launch_templates import LaunchTemplates

    if _orig:
        return
    _orig["describe_images"] = AmiBackend.describe_images
    _orig["modify_image_attribute"] = AmiBackend.modify_image_attribute
    _orig["describe_image_attribute"] = AmiBackend.describe_image_attribute
    _orig["create_image"] = AmiBackend.create_image
    _orig["modify_launch_template"] = LaunchTemplateBackend.modify_launch_template

    AmiBackend.describe_images = _describe_images
    AmiBackend.modify_image_attribute = _modify_image_attribute
    AmiBackend.describe_image_attribute = _describe_image_attribute
    AmiBackend.create_image = _create_image
    AmisResponse.register_image = _register_image_response
    AmisResponse.enable_image_deprecation = _enable_image_deprecation

    ElasticBlockStore.modify_snapshot_attribute = _modify_snapshot_attribute_response

    LaunchTemplate.get_version = _get_version
    LaunchTemplate.latest_version = _latest_version
    LaunchTemplate.tags = property(_launch_template_tags, lambda self, value: None)
    LaunchTemplateBackend.modify_launch_template = _modify_launch_template
    LaunchTemplates.create_launch_template_version = _create_launch_template_version
    LaunchTemplates.describe_launch_template_versions = _describe_launch_template_versions
    LaunchTemplates.delete_launch_template_versions = _delete_launch_template_versions
