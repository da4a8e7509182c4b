"""Least privilege of deploy/hub.yaml and deploy/spoke.yaml ("Trust nothing the policy does not
allow"), read from the templates themselves: every IAM policy document they hold (role trust and
inline policies, role / managed policies, bus, queue, topic, key, log and bucket policies, Lambda
permissions) is walked, and each test fails when a wildcard or a missing condition comes back.

No AWS and no emulator: the templates are parsed with PyYAML (CloudFormation's short-form tags
become their long form) and ``Fn::ForEach`` fragments are read as they are written, their logical
ids keeping the ``${Id}`` placeholder. An ``Fn::If`` is judged in both of its branches."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
from typing import Any, Iterator

import yaml

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deploy")
TEMPLATES = ("hub.yaml", "spoke.yaml")
OTHER = {"hub.yaml": "spoke.yaml", "spoke.yaml": "hub.yaml"}
NO_VALUE = {"Ref": "AWS::NoValue"}

# Allow statements whose Resource is "*" and whose Action has a wildcard, each with its reason.
# (template, logical id, Sid) -> why it is not a wildcard grant.
WILDCARD_EXCEPTIONS = {
    ("hub.yaml", "Key", "AccountAdministersTheKeyThroughIam"): (
        "the default key policy statement: in a key policy Resource '*' is this key only, and the "
        "principal is the key's own account, which delegates the key to IAM policies (without it "
        "the key becomes unmanageable)"),
    ("spoke.yaml", "Key", "AccountAdministersTheKeyThroughIam"): (
        "the default key policy statement: Resource '*' is this key only, the principal is the "
        "key's own account (delegation to IAM)"),
    ("hub.yaml", "Key", "CloudWatchLogsEncryptsWorkerLogsAndTheAuditTrail"): (
        "AWS's documented key policy for CloudWatch Logs (kms:Encrypt*, Decrypt*, ReEncrypt*, "
        "GenerateDataKey*, Describe*): Resource '*' is this key only, and the statement is limited "
        "to amiflow's log groups by kms:EncryptionContext:aws:logs:arn"),
    ("spoke.yaml", "Key", "CloudWatchLogsEncryptsWorkerLogs"): (
        "AWS's documented key policy for CloudWatch Logs: Resource '*' is this key only, limited to "
        "amiflow's log groups by kms:EncryptionContext:aws:logs:arn"),
}


# --------------------------------------------------------------------------------------------
# Reading the templates
# --------------------------------------------------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    """YAML loader for CloudFormation: ``!Ref X`` -> {"Ref": X}, ``!Condition X`` -> {"Condition": X},
    ``!GetAtt A.B`` -> {"Fn::GetAtt": [A, B]}, any other ``!Tag v`` -> {"Fn::Tag": v}."""


def _short_form(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix in ("Ref", "Condition"):
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _short_form)


@functools.cache
def template(name: str) -> dict[str, Any]:
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.load(f, Loader=CfnLoader)


def resources(name: str) -> dict[str, dict[str, Any]]:
    """Logical id -> resource; Fn::ForEach fragments keep their ${Id} logical ids."""

    def flatten(section: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, body in section.items():
            if key.startswith("Fn::ForEach::"):
                out.update(flatten(body[2]))
            else:
                out[key] = body
        return out

    return flatten(template(name)["Resources"])


def of_type(name: str, *types: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in resources(name).items() if r.get("Type") in types}


def props(resource: dict[str, Any]) -> dict[str, Any]:
    return resource.get("Properties") or {}


def values(node: Any) -> list[Any]:
    """The leaf values a property may take: lists flattened, both branches of an Fn::If, no NoValue."""
    if node is None or node == NO_VALUE:
        return []
    if isinstance(node, list):
        return [v for item in node for v in values(item)]
    if isinstance(node, dict) and "Fn::If" in node:
        return values(node["Fn::If"][1]) + values(node["Fn::If"][2])
    return [node]


def variants(node: Any) -> list[Any]:
    """A value with an Fn::If at its top in each of its branches (NoValue: absent)."""
    if isinstance(node, dict) and "Fn::If" in node:
        return [v for branch in node["Fn::If"][1:] for v in variants(branch)]
    return [] if node == NO_VALUE else [node]


def text(value: Any) -> str:
    """A readable form of a value: a Sub's string, GetAtt:X.Y, Ref:X, or the literal."""
    if isinstance(value, dict):
        if "Fn::Sub" in value:
            sub = value["Fn::Sub"]
            return sub[0] if isinstance(sub, list) else sub
        if "Fn::GetAtt" in value:
            return "GetAtt:" + ".".join(value["Fn::GetAtt"])
        if "Ref" in value:
            return "Ref:" + value["Ref"]
        return json.dumps(value, sort_keys=True)
    return str(value)


def plain(arn: str) -> str:
    """An ARN with its ${...} references as <...> (no colons inside), to split on ':'."""
    return re.sub(r"\$\{([^}]+)\}", lambda m: "<" + m.group(1).replace(":", "_") + ">", arn)


def getatt(logical: str, attribute: str = "Arn") -> dict[str, Any]:
    return {"Fn::GetAtt": [logical, attribute]}


# --------------------------------------------------------------------------------------------
# Walking the policy documents
# --------------------------------------------------------------------------------------------

IDENTITY_POLICY_TYPES = ("AWS::IAM::RolePolicy", "AWS::IAM::Policy", "AWS::IAM::ManagedPolicy",
                         "AWS::IAM::UserPolicy", "AWS::IAM::GroupPolicy")
RESOURCE_POLICY_TYPES = {"AWS::SQS::QueuePolicy": "queue", "AWS::SNS::TopicPolicy": "topic",
                         "AWS::S3::BucketPolicy": "bucket", "AWS::Logs::ResourcePolicy": "logs"}


def document(node: Any) -> dict[str, Any]:
    """A policy document, parsing the JSON string form (an Fn::Sub's ${...} stay in the strings)."""
    if isinstance(node, dict) and "Fn::Sub" in node:
        node = text(node)
    if isinstance(node, str):
        return json.loads(node)
    return node


def policy_documents(name: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(kind, logical id, document) of every policy the template declares. Kinds: trust, identity,
    bus, queue, topic, bucket, logs, key, permission (an AWS::Lambda::Permission as a statement)."""
    for logical, resource in resources(name).items():
        rtype, p = resource.get("Type"), props(resource)
        if rtype == "AWS::IAM::Role":
            yield "trust", logical, document(p["AssumeRolePolicyDocument"])
            for policy in p.get("Policies") or []:
                yield "identity", logical, document(policy["PolicyDocument"])
        elif rtype in IDENTITY_POLICY_TYPES:
            yield "identity", logical, document(p["PolicyDocument"])
        elif rtype == "AWS::Events::EventBus" and p.get("Policy"):
            yield "bus", logical, document(p["Policy"])
        elif rtype == "AWS::Events::EventBusPolicy":
            yield "bus", logical, (document(p["Statement"]) if "Statement" in p and "Statement" not in p["Statement"]
                                   else document(p.get("Statement") or p.get("Policy")))
        elif rtype in RESOURCE_POLICY_TYPES:
            yield RESOURCE_POLICY_TYPES[rtype], logical, document(p["PolicyDocument"])
        elif rtype == "AWS::KMS::Key":
            yield "key", logical, document(p["KeyPolicy"])
        elif rtype == "AWS::Lambda::Permission":
            principal = p["Principal"]
            key = "Service" if isinstance(principal, str) and principal.endswith(".amazonaws.com") else "AWS"
            condition: dict[str, Any] = {}
            if "SourceArn" in p:
                condition.setdefault("ArnLike", {})["aws:SourceArn"] = p["SourceArn"]
            if "SourceAccount" in p:
                condition.setdefault("StringEquals", {})["aws:SourceAccount"] = p["SourceAccount"]
            yield "permission", logical, {"Statement": [{
                "Effect": "Allow", "Principal": {key: principal}, "Action": p["Action"],
                "Resource": p["FunctionName"], "Condition": condition}]}


def statements(doc: Any) -> Iterator[dict[str, Any]]:
    """Every statement a document may hold, in each branch of an Fn::If."""
    for variant in variants(doc):
        if "Statement" not in variant:  # an EventBusPolicy's single statement
            yield variant
            continue
        body = variant["Statement"]
        for item in values(body if isinstance(body, list) else [body]):
            yield from variants(item)


def all_statements(name: str, *kinds: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(kind, logical id, statement) of every statement of the given kinds (all kinds if none)."""
    for kind, logical, doc in policy_documents(name):
        if kinds and kind not in kinds:
            continue
        for statement in statements(doc):
            yield kind, logical, statement


def where(name: str, logical: str, statement: dict[str, Any]) -> str:
    sid = statement.get("Sid")
    return f"{name} {logical}" + (f" (Sid {sid})" if sid else "")


def actions(statement: dict[str, Any]) -> list[str]:
    return [str(a) for a in values(statement.get("Action"))]


def grants(statement: dict[str, Any], action: str) -> bool:
    """Whether an Allow statement's Action covers `action` (wildcards and case as IAM reads them)."""
    return statement.get("Effect") == "Allow" and any(
        fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions(statement))


def conditions(statement: dict[str, Any], key: str) -> dict[str, list[Any]]:
    """Operator -> values of condition key `key` (case-insensitive), over both Fn::If branches."""
    out: dict[str, list[Any]] = {}
    for block in variants(statement.get("Condition") or {}):
        for operator, entries in block.items():
            for entry in variants(entries):
                for k, v in entry.items():
                    if k.lower() == key.lower():
                        found = values(v)
                        if found:
                            out.setdefault(operator, []).extend(found)
    return out


def condition_keys(statement: dict[str, Any]) -> set[str]:
    keys = set()
    for block in variants(statement.get("Condition") or {}):
        for entries in block.values():
            for entry in variants(entries):
                keys.update(entry)
    return keys


def resource_texts(statement: dict[str, Any]) -> list[str]:
    return [text(r) for r in values(statement.get("Resource"))]


def principal_values(statement: dict[str, Any], key: str | None = None) -> list[Any]:
    principal = statement.get("Principal")
    if principal is None:
        return []
    if not isinstance(principal, dict) or (key is None and "Fn::If" in principal):
        return values(principal)
    if key is None:
        return [v for k in principal for v in values(principal[k])]
    return values(principal.get(key))


def forwarding(name: str) -> tuple[set[str], set[str]]:
    """The role names and detail-types of the rules of template `name` that forward to another
    account's amiflow bus."""
    found = resources(name)
    roles, detail_types = set(), set()
    for rule in of_type(name, "AWS::Events::Rule").values():
        for target in values(props(rule).get("Targets")):
            if ":event-bus/amiflow" in text(target.get("Arn")) and "RoleArn" in target:
                role = target["RoleArn"]["Fn::GetAtt"][0]
                roles.add(props(found[role])["RoleName"])
                detail_types.update(props(rule)["EventPattern"]["detail-type"])
    return roles, detail_types


def the_parameter_or_none(name: str, value: Any) -> str | None:
    if isinstance(value, dict) and value.get("Ref") in (template(name).get("Parameters") or {}):
        return value["Ref"]
    return None


# --------------------------------------------------------------------------------------------
# The points of "Trust nothing the policy does not allow"
# --------------------------------------------------------------------------------------------


def test_every_policy_document_in_the_templates_is_walked():
    """Every "Statement" anywhere in the resources belongs to a document policy_documents yields,
    so no policy escapes the checks below (a new policy-bearing resource type must be added)."""
    for name in TEMPLATES:
        walked = {logical for _, logical, _ in policy_documents(name)}
        for logical, resource in resources(name).items():
            if "Statement" in json.dumps(props(resource)):
                assert logical in walked, (
                    f"{name} {logical}: a {resource.get('Type')} holds a policy statement that "
                    f"policy_documents does not walk")


def test_event_bus_policies_name_the_forwarding_roles_and_restrict_source_and_detail_types():
    """Point 1: a bus policy admits no '*' principal and no account or organisation without the
    forwarding role (aws:PrincipalArn) the other template's forwarding rules use, only
    events:source amiflow, and only the detail-types those rules forward (events:detail-type)."""
    for name in TEMPLATES:
        roles, detail_types = forwarding(OTHER[name])
        assert roles and detail_types, f"{OTHER[name]}: no rule forwarding to another account's amiflow bus"
        found = list(all_statements(name, "bus"))
        assert found, f"{name}: no event bus policy"
        for _, logical, statement in found:
            at = where(name, logical, statement)
            if statement.get("Effect") != "Allow":
                continue
            principals = [text(p) for p in principal_values(statement)]
            assert principals and "*" not in principals, (
                f"{at}: the bus policy admits the '*' principal ({statement.get('Principal')!r})")
            named = conditions(statement, "aws:PrincipalArn")
            role_arns = [text(v) for op, vs in named.items() if op.startswith(("Arn", "String")) for v in vs]
            if all(":role/" in p for p in principals):
                role_arns += principals
            else:
                assert role_arns, (
                    f"{at}: principal {principals} is whole accounts (or an organisation) with no "
                    f"aws:PrincipalArn condition naming the forwarding role")
            names = set()
            for arn in role_arns:
                match = re.search(r":role/(?:.*/)?([^/]+)$", arn)
                assert match and "*" not in match.group(1), f"{at}: aws:PrincipalArn {arn} names no single role"
                names.add(match.group(1))
            assert names == roles, (
                f"{at}: aws:PrincipalArn names roles {sorted(names)}; {OTHER[name]} forwards with {sorted(roles)}")
            sources = [v for op, vs in conditions(statement, "events:source").items() if "StringEquals" in op
                       for v in vs]
            assert sources and set(sources) == {"amiflow"}, (
                f"{at}: no condition events:source = amiflow (found {sources})")
            carried = [v for op, vs in conditions(statement, "events:detail-type").items() if "StringEquals" in op
                       for v in vs]
            assert carried and set(carried) == detail_types, (
                f"{at}: events:detail-type condition {sorted(carried)}; {OTHER[name]} forwards exactly "
                f"{sorted(detail_types)}")


def _tls_only(statement: dict[str, Any]) -> bool:
    secure = conditions(statement, "aws:SecureTransport").get("Bool", [])
    return (statement.get("Effect") == "Deny" and "*" in [text(p) for p in principal_values(statement)]
            and any(a in ("*", "sqs:*") for a in actions(statement)) and secure
            and all(str(v).lower() == "false" for v in secure))


def test_queue_policies_admit_events_only_from_named_rules_and_only_over_tls():
    """Point 2: an Allow in a queue policy is for events.amazonaws.com only, with aws:SourceArn naming
    the rules of the template that target or dead-letter to that queue (by GetAtt, or by a name
    pattern with a literal rule-name prefix, never rule/*); every queue has a TLS-only Deny
    (Bool aws:SecureTransport "false")."""
    for name in TEMPLATES:
        queues = of_type(name, "AWS::SQS::Queue")
        rules = of_type(name, "AWS::Events::Rule")
        policies = of_type(name, "AWS::SQS::QueuePolicy")
        assert policies, f"{name}: no queue policy"
        tls_covered: set[str] = set()
        for logical, policy in policies.items():
            covered = [q["Ref"] for q in values(props(policy)["Queues"])]
            admitted_arns: list[str] = []
            for statement in statements(props(policy)["PolicyDocument"]):
                at = where(name, logical, statement)
                if _tls_only(statement):
                    denied = resource_texts(statement)
                    tls_covered.update(q for q in covered if "*" in denied or f"GetAtt:{q}.Arn" in denied)
                    continue
                if statement.get("Effect") != "Allow":
                    continue
                principal = statement.get("Principal")
                assert isinstance(principal, dict) and set(principal) == {"Service"} and \
                    [text(v) for v in values(principal["Service"])] == ["events.amazonaws.com"], (
                        f"{at}: queue policy admits {principal!r}, not events.amazonaws.com alone")
                source = [text(v) for op, vs in conditions(statement, "aws:SourceArn").items()
                          if op.startswith("Arn") for v in vs]
                assert source, f"{at}: events.amazonaws.com admitted with no aws:SourceArn condition"
                for arn in source:
                    if arn.startswith("GetAtt:"):
                        rule = arn.removeprefix("GetAtt:").split(".")[0]
                        assert rule in rules, f"{at}: aws:SourceArn {arn} is not a rule of {name}"
                        continue
                    assert ":rule/" in arn and "*" not in arn.rsplit("/", 1)[0], f"{at}: aws:SourceArn {arn}"
                    name_pattern = arn.rsplit("/", 1)[1]
                    assert re.match(r"[A-Za-z0-9_.-]+\*?$", name_pattern) and not name_pattern.startswith("*"), (
                        f"{at}: aws:SourceArn {arn} names no rule (every rule of the bus or account)")
                admitted_arns.extend(source)

            def admits(rule_logical: str) -> bool:
                if f"GetAtt:{rule_logical}.Arn" in admitted_arns:
                    return True
                rule_name = props(rules[rule_logical]).get("Name")
                if rule_name is None:
                    return False
                sample = re.sub(r"\$\{[^}]+\}", "123456789012", text(rule_name))
                return any(not a.startswith("GetAtt:") and fnmatch.fnmatchcase(sample, a.rsplit("/", 1)[1])
                           for a in admitted_arns)

            for queue in covered:
                arn = getatt(queue)
                for rule_logical, rule in rules.items():
                    for target in values(props(rule).get("Targets")):
                        sends = target.get("Arn") == arn or (target.get("DeadLetterConfig") or {}).get("Arn") == arn
                        if sends:
                            assert admits(rule_logical), (
                                f"{name} {logical}: rule {rule_logical} sends to {queue} but its policy "
                                f"does not admit it by aws:SourceArn")
        for queue in queues:
            assert queue in tls_covered, (
                f"{name} {queue}: no queue policy denies it without TLS (Deny, Bool aws:SecureTransport 'false')")


def test_pass_role_only_on_listed_roles_and_to_named_services():
    """Point 3: iam:PassRole never on Resource '*', never through a parameter whose Default or
    allowed values can be '*', and always with a Condition iam:PassedToService."""
    found = 0
    for name in TEMPLATES:
        parameters = template(name).get("Parameters") or {}
        for _, logical, statement in all_statements(name):
            if not grants(statement, "iam:PassRole"):
                continue
            found += 1
            at = where(name, logical, statement)
            for resource in resource_texts(statement):
                assert resource != "*" and ":role/" in resource, f"{at}: iam:PassRole on Resource {resource!r}"
                role_part = resource.split(":role/", 1)[1]
                assert not role_part.startswith("*"), f"{at}: iam:PassRole on every role ({resource})"
                for reference in re.findall(r"\$\{([^}.]+)\}", role_part):
                    if reference not in parameters:
                        continue
                    slot = parameters[reference]
                    default = str(slot.get("Default", ""))
                    assert not default.startswith("*"), (
                        f"{at}: parameter {reference} feeding iam:PassRole defaults to {default!r}")
                    pattern = slot.get("AllowedPattern")
                    assert pattern is not None and re.fullmatch(str(pattern), "*") is None, (
                        f"{at}: parameter {reference} feeding iam:PassRole may be '*' (AllowedPattern {pattern!r})")
            services = [text(v) for op, vs in conditions(statement, "iam:PassedToService").items()
                        if op.startswith("String") for v in vs]
            assert services and "*" not in "".join(services), (
                f"{at}: iam:PassRole without a Condition iam:PassedToService naming the service ({services})")
    assert found, "no iam:PassRole statement in the templates (the refresh-worker needs one)"


def test_update_stack_only_where_the_policy_allows_it():
    """Point 4: cloudformation:UpdateStack never on Resource '*', and on every stack of the account
    (stack/*/*) only with a Condition on the stack's tag (aws:ResourceTag/...) naming a value."""
    found = 0
    for name in TEMPLATES:
        for _, logical, statement in all_statements(name):
            if not grants(statement, "cloudformation:UpdateStack"):
                continue
            found += 1
            at = where(name, logical, statement)
            for resource in resource_texts(statement):
                assert resource != "*", f"{at}: cloudformation:UpdateStack on Resource '*'"
                every_stack = re.search(r":stack/\*(/\*)?$", resource) or ":stack/" not in resource
                if every_stack:
                    tags = [k for k in condition_keys(statement) if k.lower().startswith("aws:resourcetag/")]
                    assert tags, (
                        f"{at}: cloudformation:UpdateStack on every stack ({resource}) with no aws:ResourceTag "
                        f"condition")
                    for tag in tags:
                        for operator, required in conditions(statement, tag).items():
                            assert operator.startswith("String") and required and \
                                all(text(v) not in ("*", "") for v in required), (
                                    f"{at}: condition {operator} {tag} {required} admits any stack")
    assert found, "no cloudformation:UpdateStack statement in the templates (the refresh-worker needs one)"


SHARING_ACTIONS = ("ec2:ModifyImageAttribute", "ec2:ModifySnapshotAttribute",
                   "ec2:DisableImageBlockPublicAccess", "ec2:DisableSnapshotBlockPublicAccess")


def _requires_a_tag(statement: dict[str, Any]) -> bool:
    for key in condition_keys(statement):
        if not key.lower().startswith(("aws:resourcetag/", "ec2:resourcetag/")):
            continue
        for operator, required in conditions(statement, key).items():
            if operator == "Null" and [str(v).lower() for v in required] == ["false"]:
                return True
            if operator.startswith("String") and not operator.startswith("StringNot") and required and \
                    all(text(v) not in ("*", "") for v in required):
                return True
    return False


def test_ami_and_snapshot_sharing_only_of_amiflow_managed_images():
    """Point 5: sharing and publishing AMIs and snapshots (ec2:ModifyImageAttribute,
    ec2:ModifySnapshotAttribute, disabling block public access) only on resources that carry
    amiflow's tag (an aws:ResourceTag/... condition that a missing or any tag does not meet)."""
    found = set()
    for name in TEMPLATES:
        for _, logical, statement in all_statements(name, "identity"):
            for action in SHARING_ACTIONS:
                if not grants(statement, action):
                    continue
                found.add(action)
                at = where(name, logical, statement)
                assert "*" not in resource_texts(statement), f"{at}: {action} on Resource '*'"
                assert _requires_a_tag(statement), (
                    f"{at}: {action} with no aws:ResourceTag condition limiting it to amiflow's AMIs and snapshots")
    assert {"ec2:ModifyImageAttribute", "ec2:ModifySnapshotAttribute"} <= found, (
        f"the share-worker's sharing statements are missing (found {sorted(found)})")


def _key_account_root(statement: dict[str, Any]) -> bool:
    """A key policy statement for the key's own account: the delegation to IAM policies."""
    own_root = "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"
    return [text(p) for p in principal_values(statement, "AWS")] == [own_root]


def test_create_grant_only_on_named_keys_with_pinned_operations_and_grantee():
    """Point 6: kms:CreateGrant never on Resource '*' nor on keys of any account, always with
    kms:GrantOperations (ForAllValues:StringEquals, no wildcard) and the grantee pinned
    (kms:GranteePrincipal, no wildcard). A key policy's delegation to its own account is IAM's."""
    for name in TEMPLATES:
        found = 0
        for kind, logical, statement in all_statements(name):
            if not grants(statement, "kms:CreateGrant"):
                continue
            at = where(name, logical, statement)
            if kind == "key" and _key_account_root(statement):
                continue
            found += 1
            for resource in resource_texts(statement):
                assert resource != "*", f"{at}: kms:CreateGrant on Resource '*'"
                match = re.search(r":kms:[^:]*:([^:]*):key/", plain(resource))
                assert match and match.group(1) not in ("", "*"), (
                    f"{at}: kms:CreateGrant on {resource}: not the keys of one named account")
            operations = conditions(statement, "kms:GrantOperations")
            assert list(operations) == ["ForAllValues:StringEquals"] and operations["ForAllValues:StringEquals"] \
                and not any("*" in text(v) for v in operations["ForAllValues:StringEquals"]), (
                    f"{at}: kms:CreateGrant without ForAllValues:StringEquals kms:GrantOperations ({operations})")
            grantee = [plain(text(v)) for op, vs in conditions(statement, "kms:GranteePrincipal").items()
                       if op in ("StringEquals", "ArnEquals") for v in vs]
            assert grantee and all("*" not in g and re.search(r":iam::[^:]+:(root|role/.+)$", g) for g in grantee), (
                f"{at}: kms:CreateGrant without the grantee pinned by kms:GranteePrincipal ({grantee})")
        assert found, f"{name}: no kms:CreateGrant statement (the share-worker / param-worker grant)"


def test_every_service_trust_names_its_source():
    """Point 7: every role trust (and Lambda permission) for a service principal carries
    aws:SourceArn or aws:SourceAccount, with a value that is not '*'."""
    found = 0
    for name in TEMPLATES:
        for _, logical, statement in all_statements(name, "trust", "permission"):
            if statement.get("Effect") != "Allow" or not principal_values(statement, "Service"):
                continue
            found += 1
            at = where(name, logical, statement)
            sources = [text(v) for key in ("aws:SourceArn", "aws:SourceAccount")
                       for vs in conditions(statement, key).values() for v in vs]
            assert sources and "*" not in sources, (
                f"{at}: trust of {[text(p) for p in principal_values(statement, 'Service')]} "
                f"without aws:SourceArn / aws:SourceAccount")
    assert found, "no service trust in the templates"


def _refers_to_a_parameter(name: str, node: Any) -> bool:
    """Whether a condition expression depends, through its named conditions, on a parameter."""
    parameters = template(name).get("Parameters") or {}
    named = template(name).get("Conditions") or {}
    if isinstance(node, dict):
        if node.get("Ref") in parameters:
            return True
        if "Condition" in node and isinstance(node["Condition"], str):
            return _refers_to_a_parameter(name, named[node["Condition"]])
        return any(_refers_to_a_parameter(name, v) for v in node.values())
    if isinstance(node, list):
        return any(_refers_to_a_parameter(name, v) for v in node)
    return False


def test_lambda_code_is_pinned_to_an_object_version_and_can_be_signed():
    """Point 8: each function's S3 code names its S3ObjectVersion (a parameter a Rules assertion
    refuses empty), and CodeSigningConfigArn is set, or set under a condition on a parameter, to
    a code signing configuration that enforces (UntrustedArtifactOnDeployment Enforce)."""
    for name in TEMPLATES:
        functions = of_type(name, "AWS::Lambda::Function")
        assert functions, f"{name}: no Lambda function"
        rules = json.dumps(template(name).get("Rules") or {})
        found = resources(name)
        for logical, function in functions.items():
            code = props(function)["Code"]
            if "S3Bucket" in code:
                version = code.get("S3ObjectVersion")
                assert version not in (None, ""), f"{name} {logical}: Code from S3 without S3ObjectVersion"
                parameter = the_parameter_or_none(name, version)
                if parameter:
                    assert json.dumps({"Ref": parameter}) in rules, (
                        f"{name} {logical}: S3ObjectVersion is parameter {parameter}, which no Rules assertion "
                        f"refuses empty")
            signing = props(function).get("CodeSigningConfigArn")
            assert signing is not None, f"{name} {logical}: no CodeSigningConfigArn"
            if isinstance(signing, dict) and "Fn::If" in signing:
                condition, *branches = signing["Fn::If"]
                assert _refers_to_a_parameter(name, (template(name).get("Conditions") or {})[condition]), (
                    f"{name} {logical}: CodeSigningConfigArn under condition {condition}, which no parameter sets")
                set_to = [b for b in branches if b != NO_VALUE]
                assert set_to, f"{name} {logical}: CodeSigningConfigArn is NoValue in both branches"
                signing = set_to[0]
            if isinstance(signing, dict) and ("Fn::GetAtt" in signing or "Ref" in signing):
                config = signing["Fn::GetAtt"][0] if "Fn::GetAtt" in signing else signing["Ref"]
                if config in found:
                    assert found[config]["Type"] == "AWS::Lambda::CodeSigningConfig", f"{name} {logical}: {config}"
                    policies = props(found[config]).get("CodeSigningPolicies") or {}
                    assert policies.get("UntrustedArtifactOnDeployment") == "Enforce", (
                        f"{name} {config}: code signing only warns (UntrustedArtifactOnDeployment {policies})")


def _dead_letter_targets(node: Any) -> Iterator[str]:
    """Logical ids of the queues every DeadLetterConfig (rule target, schedule, function) names."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "DeadLetterConfig" and isinstance(value, dict):
                for arn in values(value.get("Arn")) + values(value.get("TargetArn")):
                    if isinstance(arn, dict) and "Fn::GetAtt" in arn:
                        yield arn["Fn::GetAtt"][0]
            yield from _dead_letter_targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dead_letter_targets(item)


def _alarms_on(name: str, namespace: str, metric: str, dimension: str, value: Any) -> list[tuple[str, dict]]:
    out = []
    for logical, alarm in of_type(name, "AWS::CloudWatch::Alarm").items():
        p = props(alarm)
        if (p.get("Namespace"), p.get("MetricName")) != (namespace, metric):
            continue
        if any(d.get("Name") == dimension and d.get("Value") in value for d in values(p.get("Dimensions"))):
            out.append((logical, alarm))
    return out


def _fires_on_one(p: dict[str, Any]) -> bool:
    threshold, operator = float(p.get("Threshold", 1e9)), p.get("ComparisonOperator")
    return (operator == "GreaterThanThreshold" and threshold < 1) or \
        (operator == "GreaterThanOrEqualToThreshold" and threshold <= 1)


def test_alarms_watch_every_dead_letter_queue_the_undelivered_queue_and_every_worker():
    """Point 9: an alarm on every DLQ (a queue some RedrivePolicy names) and every undelivered queue
    (a queue some DeadLetterConfig names) firing on one visible message, an alarm on the Errors of
    every Lambda function (under the function's condition), and every alarm's AlarmActions go to
    an SNS topic of the template or to a parameter naming one."""
    for name in TEMPLATES:
        found = resources(name)
        queues = of_type(name, "AWS::SQS::Queue")
        parameters = template(name).get("Parameters") or {}
        dead_letter = {props(q)["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
                       for q in queues.values() if "RedrivePolicy" in props(q)}
        undelivered = set(_dead_letter_targets(found)) & set(queues)
        assert dead_letter and undelivered, f"{name}: found no DLQ ({dead_letter}) or undelivered queue ({undelivered})"
        for queue in sorted(dead_letter | undelivered):
            watching = _alarms_on(name, "AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName",
                                  [getatt(queue, "QueueName"), props(queues[queue]).get("QueueName")])
            assert any(_fires_on_one(props(a)) and a.get("Condition") == queues[queue].get("Condition")
                       for _, a in watching), (
                f"{name} {queue}: no alarm on its depth (ApproximateNumberOfMessagesVisible > 0) "
                f"under its condition {queues[queue].get('Condition')}")
        for logical, function in of_type(name, "AWS::Lambda::Function").items():
            watching = _alarms_on(name, "AWS/Lambda", "Errors", "FunctionName",
                                  [{"Ref": logical}, props(function).get("FunctionName")])
            assert any(_fires_on_one(props(a)) and a.get("Condition") == function.get("Condition")
                       for _, a in watching), (
                f"{name} {logical}: no alarm on its Errors (> 0) under its condition {function.get('Condition')}")
        alarms = of_type(name, "AWS::CloudWatch::Alarm")
        assert alarms, f"{name}: no CloudWatch alarm"
        for logical, alarm in alarms.items():
            targets = values(props(alarm).get("AlarmActions"))
            assert targets, f"{name} {logical}: no AlarmActions"
            for target in targets:
                ref = target.get("Ref") if isinstance(target, dict) else None
                assert ref in parameters or (ref in found and found[ref]["Type"] == "AWS::SNS::Topic"), (
                    f"{name} {logical}: AlarmActions {text(target)} is neither an SNS topic of {name} nor a parameter")


def test_no_statement_allows_every_action_or_a_whole_service_on_every_resource():
    """No Allow statement has Action '*', NotAction, NotResource or Principal '*'; a wildcard
    action ('<service>:*' or 'service:Prefix*') on Resource '*' only where WILDCARD_EXCEPTIONS
    lists it with its reason, and every exception listed still exists."""
    seen = set()
    for name in TEMPLATES:
        for kind, logical, statement in all_statements(name):
            if statement.get("Effect") != "Allow":
                continue
            at = where(name, logical, statement)
            assert "NotAction" not in statement and "NotResource" not in statement, (
                f"{at}: Allow with NotAction / NotResource")
            assert "*" not in actions(statement), f"{at}: Action '*'"
            assert "*" not in [text(p) for p in principal_values(statement)], f"{at}: Allow for Principal '*'"
            wild = [a for a in actions(statement) if "*" in a]
            if wild and "*" in resource_texts(statement):
                key = (name, logical, statement.get("Sid"))
                assert key in WILDCARD_EXCEPTIONS, f"{at}: {wild} on Resource '*' ({kind} policy)"
                seen.add(key)
    assert seen == set(WILDCARD_EXCEPTIONS), f"stale WILDCARD_EXCEPTIONS: {sorted(set(WILDCARD_EXCEPTIONS) - seen)}"
