"""deploy/k8s agrees with the service configs and `mmserve up`, plaintext and with its tls and api-tokens components."""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from tests.unit.compose_files import (COMPOSE_ONLY, CONFIGS, GPU_SERVICES, PLAN_ONLY, ROOT, TLS_FIELDS, TLS_MOUNT,
                                     TOKENS_FILE, flag_names, parse_command, parse_unified, planned, planned_flags,
                                     probe_tls)

K8S = ROOT / "deploy" / "k8s"
COMPONENTS = ("tls", "api-tokens")
UNIFIED = K8S / "unified"  # a component too, in place of the encoder and llm (not with tls yet)
# On Kubernetes the router finds the stages in the registry only: a Service's address would alias one of its pods.
K8S_ROUTER_UNLISTED = {"decoder_addrs", "encoder_addrs", "llm_addrs"}
# Pods call each other at pod IPs, which no certificate names: they check this name instead (`mmserve up` dials
# loopback addresses its development certificates carry, so it needs none).
K8S_TLS_ONLY = {"tls_server_name"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
POD_IP = "10.1.2.3"
SECRETS_MOUNT = "/secrets"  # the Secret mmserve-secrets: `mmserve secrets` files
RUN_AS = 10001  # the image's user (Dockerfile), and the group that may read the mounted Secrets


def k8s_documents() -> list[dict]:
    """Every Kubernetes object in deploy/k8s (the kustomization file aside)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "Kustomization"]
    return docs


def apply_json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 `add`, the one operation the components use (`/-` appends to a list)."""
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = [key.replace("~1", "/").replace("~0", "~") for key in op["path"].split("/")[1:]]
        target = doc
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            target[last] = copy.deepcopy(op["value"])


def deployments(components: tuple[str, ...] = ()) -> dict[str, dict]:
    """The mmserve services' Deployments, with the patches of the named components applied (as kustomize does); with
    the unified component, its Deployment in place of the encoder's and the llm's."""
    docs = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Deployment"}
    if UNIFIED.name in components:
        del docs["encoder"], docs["llm"]
        docs |= {d["metadata"]["name"]: d for d in yaml.safe_load_all((UNIFIED / "unified.yaml").read_text())
                 if d["kind"] == "Deployment"}
    for component in (c for c in components if c != UNIFIED.name):
        kustomization = yaml.safe_load((K8S / component / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component" and set(kustomization) == {"apiVersion", "kind", "patches"}
        for patch in kustomization["patches"]:
            target = patch["target"]
            assert set(target) == {"kind", "name"} and target["kind"] == "Deployment", target
            matched = [name for name in docs if re.fullmatch(target["name"], name)]  # kustomize: a regex
            # kustomize leaves a patch whose target is absent: the unified replica's, without the unified component
            assert matched or target["name"] == UNIFIED.name, f"{component}: {target['name']} matches no Deployment"
            for name in matched:
                apply_json_patch(docs[name], yaml.safe_load(patch["patch"]))
    return {name: doc for name, doc in docs.items() if name in CONFIGS or name == UNIFIED.name}


def container_argv(doc: dict) -> list[str]:
    """The container's args as Kubernetes runs them: $(VAR) from the ConfigMap and the downward API."""
    env = {}
    for config_map in (d for d in k8s_documents() if d["kind"] == "ConfigMap"):
        env.update(config_map["data"])
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container.get("env", [])}
    env |= {var: {"status.podIP": POD_IP}[path] for var, path in fields.items()}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def secret_mounts(doc: dict) -> dict[str, str]:
    """Mount path → Secret name of a Deployment's container; each read-only, readable by the image's group only."""
    pod = doc["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount["readOnly"], mount
            assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == RUN_AS, secret
            mounts[mount["mountPath"]] = secret["secretName"]
    return mounts


def test_k8s_manifests_parse_and_cover_every_service():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.parent.name for p in K8S.glob("*/kustomization.yaml")} == {*COMPONENTS, UNIFIED.name}
    docs = k8s_documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name in ("redis", "decoder", "encoder", "llm", "router"):
        assert ("Deployment", name) in kinds and ("Service", name) in kinds, name
    assert any(kind == "ConfigMap" for kind, _ in kinds)
    assert all("namespace" not in d["metadata"] for d in docs), "namespace-less: kubectl -n picks it"


def test_k8s_args_are_real_flags_and_probes_use_mmserve_probe():
    wanted_flags = planned_flags()
    for name, doc in deployments().items():
        pod = doc["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container_argv(doc)
        config = parse_command(args)
        assert type(config) is CONFIGS[name] and config.host == "0.0.0.0"
        assert config.registry_url == "redis://redis:6379/0", name
        assert config.advertise_address == f"{POD_IP}:{config.port}", f"{name}: advertise the pod IP and port"
        unlisted = K8S_ROUTER_UNLISTED if name == "router" else set()
        # Plaintext and an open API: TLS and tokens are the components' business.
        passed, wanted = flag_names(args) - COMPOSE_ONLY[name], wanted_flags[name] - PLAN_ONLY[name] - unlisted
        assert passed == wanted - TLS_FIELDS, f"{name}: the manifest lacks {wanted - passed}, adds {passed - wanted}"
        for probe in PROBES:
            command = container[probe]["exec"]["command"]
            assert command == ["python", "-m", "mmserve.probe", f"127.0.0.1:{config.port}"], (name, probe)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] == "/model":
                assert mount["readOnly"] and volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"]
        if name in GPU_SERVICES:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert secret_mounts(doc) == {SECRETS_MOUNT: "mmserve-secrets"}, name  # internal token, Redis password
    assert set(deployments()) == set(CONFIGS)


@pytest.mark.parametrize("components", [("tls",), ("api-tokens",), COMPONENTS])
def test_components_configure_what_mmserve_up_plans(components):
    """With tls, every service gets the TLS flags and values `mmserve up --tls-dir /tls` plans, and the probes the
    client certificate its health checks present; with api-tokens, the router gets the tokens file."""
    wanted_flags, plans = planned_flags(), planned()
    with_tls, with_tokens = "tls" in components, "api-tokens" in components
    for name, doc in deployments(components).items():
        args = container_argv(doc)
        config, (plan_config, child) = parse_command(args), plans[name]
        unlisted = K8S_ROUTER_UNLISTED if name == "router" else set()
        wanted = wanted_flags[name] - PLAN_ONLY[name] - unlisted
        wanted -= set() if with_tls else TLS_FIELDS - {"api_tokens_file"}
        wanted -= set() if with_tokens else {"api_tokens_file"}
        passed = flag_names(args) - COMPOSE_ONLY[name] - (K8S_TLS_ONLY if with_tls else set())
        assert passed == wanted, f"{name}: the manifest lacks {wanted - passed}, adds {passed - wanted}"
        for field in wanted & TLS_FIELDS:
            assert getattr(config, field) == getattr(plan_config, field), f"{name}: {field}"
        assert config.tls_server_name == ("mmserve.internal" if with_tls else "")
        for probe in PROBES:
            command = doc["spec"]["template"]["spec"]["containers"][0][probe]["exec"]["command"]
            assert command[:4] == ["python", "-m", "mmserve.probe", f"127.0.0.1:{config.port}"], (name, probe)
            client = dataclasses.replace(child.client_tls, server_name=config.tls_server_name) if with_tls else None
            assert probe_tls(["CMD", *command]) == client, (name, probe)
        mounts = {SECRETS_MOUNT: "mmserve-secrets", **({TLS_MOUNT: "mmserve-tls"} if with_tls else {})}
        if with_tokens and name == "router":
            mounts[TOKENS_FILE.rsplit("/", 1)[0]] = "mmserve-api-tokens"
        assert secret_mounts(doc) == mounts, name


def kustomize(components: tuple[str, ...], tmp_path) -> list[dict]:
    """What `kubectl kustomize` builds from deploy/k8s with the named components, in that order."""
    overlay = K8S.parent / f".test-overlay-{tmp_path.name}"  # kustomize loads bases from below or beside a root
    overlay.mkdir()
    try:
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(
            {"resources": ["../k8s"], "components": [f"../k8s/{c}" for c in components]}))
        built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(overlay)
    assert built.returncode == 0, built.stderr
    return list(yaml.safe_load_all(built.stdout))


def assert_same_pod(theirs: dict, ours: dict, name: str) -> None:
    """Kustomize's Deployment and this test's agree on what the components patch."""
    pod, expected = theirs["spec"]["template"]["spec"], ours["spec"]["template"]["spec"]
    assert pod["securityContext"] == expected["securityContext"] and pod["volumes"] == expected["volumes"], name
    for key in ("args", "volumeMounts", *PROBES):
        assert pod["containers"][0][key] == expected["containers"][0][key], (name, key)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
def test_kustomize_applies_the_components_as_this_test_does(tmp_path):
    ours = deployments(COMPONENTS)
    theirs = {d["metadata"]["name"]: d for d in kustomize(COMPONENTS, tmp_path)
              if d["kind"] == "Deployment" and d["metadata"]["name"] in CONFIGS}
    assert set(theirs) == set(ours)
    for name, doc in theirs.items():
        assert_same_pod(doc, ours[name], name)


def test_the_unified_component_runs_both_roles_with_their_deployments_flags_registered_as_the_pair():
    doc = deployments((UNIFIED.name,))[UNIFIED.name]
    argv = container_argv(doc)
    assert argv[0] == "stack.unified"
    encoder, llm, _ = parse_unified(argv[1:])
    for role, config in (("encoder", encoder), ("llm", llm)):
        inner = shlex.split(argv[argv.index(f"--{role}-args") + 1])
        alone = container_argv(deployments()[role])  # the role's own Deployment
        assert flag_names(inner) == flag_names(alone), role
        expected = dataclasses.replace(parse_command(alone), metrics_port=config.metrics_port)
        assert config == expected, role  # every value as there, but the one metrics port
        assert config.advertise_address == f"{POD_IP}:{config.port}", role
    assert (encoder.metrics_port, llm.metrics_port) == (0, 9400)  # one registry per process: served once
    assert llm.registry_url  # the llm registers the pair (stack.flex.run_flex)
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    for probe in PROBES:  # the llm's port: the last role up and the first down
        assert container[probe]["exec"]["command"] == ["python", "-m", "mmserve.probe", f"127.0.0.1:{llm.port}"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert secret_mounts(doc) == {SECRETS_MOUNT: "mmserve-secrets"}


def test_the_tls_component_gives_both_roles_of_a_unified_replica_what_mmserve_up_unified_plans():
    doc = deployments((UNIFIED.name, "tls"))[UNIFIED.name]
    encoder, llm, _ = parse_unified(container_argv(doc)[1:])
    plans = planned(unified=True)
    for role, config in (("encoder", encoder), ("llm", llm)):
        for field in TLS_FIELDS - {"api_tokens_file"} - K8S_TLS_ONLY:
            assert getattr(config, field) == getattr(plans[role][0], field), (role, field)
        assert config.tls_server_name == "mmserve.internal", role
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    client = dataclasses.replace(plans["llm"][1].client_tls, server_name="mmserve.internal")
    for probe in PROBES:
        assert probe_tls(["CMD", *container[probe]["exec"]["command"]]) == client, probe
    assert secret_mounts(doc) == {SECRETS_MOUNT: "mmserve-secrets", TLS_MOUNT: "mmserve-tls"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
def test_kustomize_puts_the_unified_replica_in_place_of_the_encoder_and_llm(tmp_path):
    components = (UNIFIED.name, *COMPONENTS)  # the unified component first: tls patches its Deployment
    docs = kustomize(components, tmp_path)
    objects = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {kind for kind, name in objects if name in ("encoder", "llm")} == set()
    assert {("Deployment", "unified"), ("Deployment", "decoder"), ("Deployment", "router")} <= objects
    (theirs,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == UNIFIED.name]
    assert_same_pod(theirs, deployments(components)[UNIFIED.name], UNIFIED.name)


def test_router_keys_the_cache_with_the_encoders_dtype():
    """Both from the ConfigMap's one DTYPE, so the router's cache keys name the encoders' precision."""
    docs = deployments()
    (encoder,), (router,) = (docs[name]["spec"]["template"]["spec"]["containers"] for name in ("encoder", "router"))
    assert router["args"][router["args"].index("--encoder-dtype") + 1] == "$(DTYPE)"
    assert encoder["args"][encoder["args"].index("--dtype") + 1] == "$(DTYPE)"
