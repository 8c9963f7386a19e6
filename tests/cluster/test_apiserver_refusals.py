"""A real kube-apiserver and `mot run` refuse the same MoTRuns, naming the same field.

Every invalid MoTRun of tests/support/invalid_motruns.py is sent to the apiserver (dry run, strict
field validation, as `kubectl apply` sends it) and given to parse_spec. The apiserver must refuse it
naming the field, and parse_spec must say word for word what the apiserver says first about it (an
unknown field: the strict decoding error's words, then the known fields). Edits of a stored MoTRun:
the same for check_update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.invalid_motruns import INVALID, minimal

from mot_operator.spec import GROUP, PLURAL, VERSION, SpecError, check_update, parse_spec, validated

pytestmark = pytest.mark.e2e

CRD = Path(__file__).resolve().parents[2] / "crds" / "motruns.mot.dev.yaml"
NAMESPACE = "refusals"


@pytest.fixture(scope="module")
def custom_api(kube_cluster):
    from kubernetes import client, config

    kube_cluster.kubectl("apply", "-f", str(CRD))
    kube_cluster.kubectl("wait", "--for=condition=Established", "crd/motruns.mot.dev", "--timeout=60s")
    if kube_cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        kube_cluster.kubectl("create", "namespace", NAMESPACE)
    api = config.new_client_from_config(config_file=str(kube_cluster.kubeconfig))
    yield client.CustomObjectsApi(api)
    api.close()


def refusal(call) -> tuple[str, list[dict]]:
    """The apiserver's message and causes ({field, message, reason}) for a refused request."""
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status in (400, 422), info.value
    body = json.loads(info.value.body)
    return body["message"], (body.get("details") or {}).get("causes") or []


def create(api, manifest: dict, dry_run: str | None = "All"):
    kwargs = {"dry_run": dry_run} if dry_run else {}
    return api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, manifest,
                                               field_validation="Strict", **kwargs)


@pytest.mark.parametrize("case,manifest,field,by", INVALID, ids=[c[0] for c in INVALID])
def test_the_apiserver_and_parse_spec_refuse_naming_the_same_field(custom_api, case, manifest, field, by):
    manifest = {**manifest, "metadata": {"name": case}}
    message, causes = refusal(lambda: create(custom_api, manifest))
    named = {c.get("field") for c in causes}
    print(f"\n{case}: {message}")
    # Strict decoding names an unknown field in the message only ('unknown field "spec.x"').
    assert field in named or f'unknown field "{field}"' in message, (field, message, causes)
    with pytest.raises(SpecError) as info:
        parse_spec(manifest["spec"])
    assert info.value.field == field, str(info.value)
    if causes:
        first = next(c for c in causes if c.get("field") == field)
        assert str(info.value) == f"{first['field']}: {first['message']}", (by, causes)
    else:
        assert str(info.value).startswith(f'{field}: unknown field "{field}" (known fields: '), str(info.value)


def test_an_edit_is_refused_as_check_update_refuses_it(custom_api):
    stored = {**minimal(), "metadata": {"name": "edited"}}
    created = create(custom_api, stored, dry_run=None)
    edits = {
        "spec.training": {"training": {"steps": 51}},
        "spec.teachers": {"teachers": [{"name": "teacher-a", "dataset": "s3://other.jsonl"}]},
        "spec.storage": {"storage": {"uri": "s3://elsewhere"}},
    }
    for field, change in edits.items():
        new = {**created, "spec": {**created["spec"], **change}}
        message, causes = refusal(lambda new=new: custom_api.replace_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, "edited", new))
        print(f"\n{field}: {message}")
        with pytest.raises(SpecError) as info:
            check_update(created["spec"], new["spec"])
        assert info.value.field == field
        assert any(f"{c['field']}: {c['message']}" == str(info.value) for c in causes), (str(info.value), causes)
    # What the apiserver allows on update, check_update allows: rounds and suspend.
    allowed = {**created, "spec": {**created["spec"], "rounds": 7, "suspend": True}}
    custom_api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "edited", allowed)
    check_update(created["spec"], allowed["spec"])


@pytest.mark.parametrize("example", sorted((CRD.parents[1] / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_admitted_as_mot_run_reads_it(custom_api, example):
    """The examples users start from pass the apiserver (dry run, strict) and parse_spec alike, and
    the apiserver's defaults are the ones parse_spec applies."""
    import yaml

    manifest = yaml.safe_load(example.read_text())
    stored = create(custom_api, manifest)
    assert stored["spec"]["training"] == validated(manifest["spec"])["training"]
    assert parse_spec(manifest["spec"]).teachers
