"""SSM extension: validation of ``DataType = aws:ec2:image`` parameters.

moto 5.2.5 accepts any value for ``aws:ec2:image`` (see ``_valid_parameter_data_type`` in
moto/ssm/models.py). AWS validates such a value asynchronously: ``PutParameter`` answers 200 with a
version number, then, if the AMI is not available to the account, the new version is dropped
("the parameter will not be created or updated"; ``GetParameter`` keeps returning the previous
version, or ``ParameterNotFound`` for a new parameter). Source: SSM API reference, PutParameter
``DataType``, and the user guide page "Native parameter support for Amazon Machine Image IDs".

Emulation:
* A value not shaped like an AMI id (``ami-`` + 8 or 17 lowercase hex digits) is rejected at once
  with ``ValidationException``. AWS's documentation describes even format errors as asynchronous and
  we could not confirm the exact message AWS uses, if any; the synchronous rejection is the
  project's deliberate choice (a malformed id is a bug in the caller, better loud).
* A well-shaped id that the account cannot see (shared AMIs count, through the shared-AMI-aware
  ``describe_images`` of amiflow_shim.ec2) is accepted, the version number is returned, and the new
  version is discarded straight away: there is no window in which the bad value is readable.
* Overwriting an ``aws:ec2:image`` parameter without ``DataType`` keeps ``aws:ec2:image`` (moto's
  response handler defaults the field to ``text``, which silently changed the type; AWS does not
  let a parameter move to or from ``aws:ec2:image``).
"""

from __future__ import annotations

import re
from typing import Any

AMI_ID = re.compile(r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$")
IMAGE = "aws:ec2:image"

_orig: dict[str, Any] = {}


def _visible(account_id: str, region: str, ami_id: str) -> bool:
    from moto.ec2.exceptions import InvalidAMIIdError
    from moto.ec2.models import ec2_backends

    try:
        return bool(ec2_backends[account_id][region].describe_images(ami_ids=[ami_id]))
    except InvalidAMIIdError:
        return False


def _put_parameter(self, name, description, value, parameter_type, allowed_pattern, keyid,
                   overwrite, tags, data_type, tier=None, policies=None):
    from moto.ssm.exceptions import ValidationException

    existing = self._parameters.get(name) if name in self._parameters else None
    previous = existing[-1] if existing else None
    if previous is not None and previous.data_type == IMAGE and data_type in (None, "text") and overwrite:
        data_type = IMAGE

    if data_type != IMAGE:
        return _orig["put_parameter"](self, name, description, value, parameter_type, allowed_pattern,
                                      keyid, overwrite, tags, data_type, tier=tier, policies=policies)

    if value and not AMI_ID.match(value):
        raise ValidationException(
            f"Parameter value, {value}, is not a valid AMI ID for data type {IMAGE}. "
            "The value must be in the format ami-0123456789abcdef0."
        )

    param = _orig["put_parameter"](self, name, description, value, parameter_type, allowed_pattern,
                                   keyid, overwrite, tags, data_type, tier=tier, policies=policies)
    if value and not _visible(self.account_id, self.region_name, value):
        # AWS's asynchronous validation fails: the version never becomes readable.
        versions = self._parameters.get(name, [])
        if versions and versions[-1] is param:
            versions.pop()
        if not versions:
            del self._parameters[name]
            self._resource_tags.get("Parameter", {}).pop(name, None)
    return param


def apply() -> None:
    from moto.ssm.models import SimpleSystemManagerBackend

    if _orig:
        return
    _orig["put_parameter"] = SimpleSystemManagerBackend.put_parameter
    SimpleSystemManagerBackend.put_parameter = _put_parameter
