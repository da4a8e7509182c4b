"""Server-side fast paths that change no behaviour, only cost (measured on a seed-scale world:
provisioning went from 68 s to 40 s).

- moto lists its own package directory on disk for every request (`list_of_moto_modules`); the
  list never changes while the server runs, so it is computed once.
- Every instance launch describes its AMI with an `image-id` filter, which makes moto scan all of
  its ~1,300 default AMIs; an exact id (no wildcards) is looked up directly instead. Must be
  applied before amiflow_shim.ec2 wraps describe_images, so shared-AMI visibility still applies.
- DescribeTags with a `resource-id` filter matches every tag of the account against every id's
  pattern (200 ids and a seed-scale account's 20,000 tags: four million regex matches a call);
  exact ids (no wildcards) only look at those resources' tags, through the same filter code.
"""

_WILDCARDS = ("*", "?", "[", "\\")


class _TagsOf:
    """A TagBackend's view of only some resources, for its own describe_tags."""

    def __init__(self, backend, ids):
        self.VALID_TAG_FILTERS = backend.VALID_TAG_FILTERS
        self.tags = {i: dict(backend.tags[i]) for i in dict.fromkeys(ids) if i in backend.tags}


def apply():
    from moto import backends
    from moto.ec2.models import amis as amis_mod

    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules

    original = amis_mod.AmiBackend.describe_images
    if getattr(original, "_amiflow_speed", False):
        return
    _tags_by_id()

    def describe_images(self, ami_ids=None, filters=None, exec_users=None, owners=None):
        if filters and list(filters) == ["image-id"] and not ami_ids and not owners and not exec_users:
            ids = filters["image-id"] if isinstance(filters["image-id"], list) else [filters["image-id"]]
            if all(isinstance(i, str) and "*" not in i and "?" not in i for i in ids):
                return [self.amis[i] for i in ids if i in self.amis]
        return original(self, ami_ids=ami_ids, filters=filters, exec_users=exec_users, owners=owners)

    describe_images._amiflow_speed = True
    amis_mod.AmiBackend.describe_images = describe_images


def _tags_by_id():
    from moto.ec2.models.tags import TagBackend

    original = TagBackend.describe_tags

    def describe_tags(self, filters=None):
        ids = (filters or {}).get("resource-id")
        if ids and all(isinstance(i, str) and not any(w in i for w in _WILDCARDS) for i in ids):
            return original(_TagsOf(self, ids), filters)
        return original(self, filters)

    TagBackend.describe_tags = describe_tags
