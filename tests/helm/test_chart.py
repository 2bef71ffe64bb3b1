"""The Helm chart (helm/icgate), checked without a cluster and without a `helm` binary.

Helm's own Go SDK renders and lints it (helm-python-sdk bundles it as a shared library: the same engine, Sprig
functions and values-schema check as `helm template` / `helm lint`, offline). Every rendered manifest is then
validated strictly (unknown fields refused) against the Kubernetes OpenAPI schemas of one current version
that kubernetes-validate ships, and the ServiceMonitor, a custom resource those schemas do not cover, against
the prometheus-operator CRD's generated models. The assertions are what the gateway needs of its pods: the
probes, a drain that outlasts the gateway's own, migrations before the rollout, the policy where `--policy`
reads it, no secret outside a Secret, resources on every container.

What only a real cluster proves (scheduling, image pulls, the hooks' timing against a live API server,
PostgreSQL answering) is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import base64
import copy
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from icgate.gateway.api.drain import CUT_MARGIN_S
from icgate.gateway.cli.main import build_parser
from icgate.gateway.config import Policy, load_policy

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "icgate"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
# The newest Kubernetes whose schemas kubernetes-validate ships (1.37.0): every manifest must be valid there.
KUBE_VERSION = "1.37.0"
RELEASE = "icgate"
NAMESPACE = "llm"
# Rendered into every secret value; it must appear in Secrets only.
SENTINEL = "sentinel-5e1d7c-never-outside-a-secret"

Manifest = dict[str, Any]


def render(values: dict[str, Any], *, upgrade: bool = False) -> list[Manifest]:
    """The chart rendered as `helm install` (or `upgrade`) would, as parsed manifests (NOTES.txt left out)."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=not upgrade, is_upgrade=upgrade
        )
    return [
        doc
        for path, text in sorted(out.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def production() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return values


def with_sentinel_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every secret given by value (the chart makes the Secrets), each holding SENTINEL."""
    values = copy.deepcopy(values)
    values["secret"] = {"adminKey": SENTINEL, "providerKeys": {"OPENAI_API_KEY": SENTINEL}}
    values["externalDatabase"] = {"url": f"postgresql+psycopg://icgate:{SENTINEL}@db:5432/icgate"}
    values["externalRedis"] = {"url": f"redis://:{SENTINEL}@redis:6379/0"}
    return values


CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": production(),
    "production-inline-secrets": with_sentinel_secrets(production()),
    "trial-with-redis": {
        "redis": {"enabled": True, "auth": {"password": SENTINEL}},
        "postgresql": {"auth": {"password": SENTINEL}},
        "secret": {"adminKey": SENTINEL, "providerKeys": {"OPENAI_API_KEY": SENTINEL}},
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(values) for name, values in CONFIGS.items()}


def only(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}: {[m['metadata']['name'] for m in found]}"
    return found[0]


def kinds(manifests: list[Manifest]) -> set[str]:
    return {m["kind"] for m in manifests}


def gateway(manifests: list[Manifest]) -> Manifest:
    return only(manifests, "Deployment", RELEASE)


def container(deployment_or_job: Manifest, name: str) -> Manifest:
    spec = deployment_or_job["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def env_of(c: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in c.get("env", [])}


def policy_in(config_map: Manifest, directory: Path) -> Policy:
    """The policy a ConfigMap carries, read by the gateway's own loader (which refuses any invalid one)."""
    path = directory / f"{config_map['metadata']['name']}.yaml"
    path.write_text(config_map["data"]["policy.yaml"])
    return load_policy(path)


def hook(m: Manifest) -> tuple[set[str], int, set[str]]:
    notes = m["metadata"].get("annotations", {})
    return (
        set(notes.get("helm.sh/hook", "").split(",")) - {""},
        int(notes.get("helm.sh/hook-weight", "0")),
        set(notes.get("helm.sh/hook-delete-policy", "").split(",")) - {""},
    )


# --- Helm's own checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["default", "production"])
def test_lint_is_clean_with_warnings_as_errors(config: str) -> None:
    report = helm.lint(CHART, CONFIGS[config], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is information (only "icon is recommended"); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_values_schema_refuses_a_typo_at_the_top_level_and_below() -> None:
    with helm.Chart.load(CHART) as chart:
        # Every value the chart ships, and the production file over them, is described by the schema.
        for config in ("default", "production"):
            chart.validate_schema(chart.merge_values(CONFIGS[config]))
        with pytest.raises(helm.HelmValuesError, match="replicaCont"):
            chart.validate_schema({"replicaCont": 3})
        with pytest.raises(helm.HelmValuesError, match="enable"):
            chart.validate_schema({"autoscaling": {"enable": True}})
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"externalDatabase": {"url": "mysql://db/icgate"}})
    # Rendering checks the schema too, as `helm install` does.
    with pytest.raises(helm.HelmError, match="replicaCont"):
        render({"replicaCont": 3})


def test_a_release_without_a_database_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="no database"):
        render({"postgresql": {"enabled": False}})
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render({"externalDatabase": {"url": "postgresql+psycopg://u:p@db/icgate"}})


# --- Kubernetes' schemas ---------------------------------------------------------------------------------


EXPECTED_KINDS = {
    "default": {
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    },
    "production": {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "Job",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    },
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_manifest_is_valid_for_kubernetes_strictly(
    rendered: dict[str, list[Manifest]], config: str
) -> None:
    manifests = rendered[config]
    if config in EXPECTED_KINDS:
        assert kinds(manifests) == EXPECTED_KINDS[config]
    checked = 0
    for m in manifests:
        if m["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a custom resource: test_service_monitor_matches_the_prometheus_operator_crd
        assert kubernetes_validate.validate(m, KUBE_VERSION, strict=True) == "1.37"
        checked += 1
    assert checked == len([m for m in manifests if m["kind"] != "ServiceMonitor"]) > 0


def test_the_validator_refuses_an_unknown_field(rendered: dict[str, list[Manifest]]) -> None:
    """The check above is not vacuous: a misspelt field in a container is refused."""
    broken = copy.deepcopy(gateway(rendered["default"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 8080}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_service_monitor_matches_the_prometheus_operator_crd(rendered: dict[str, list[Manifest]]) -> None:
    """Validated by the pydantic models generated from prometheus-operator's CRDs (types, enums, patterns,
    required fields); a field the CRD does not know would be dropped by them, so the round trip must give
    the manifest back unchanged."""
    # Imported by name: 2 MB of generated models that mypy need not read.
    crd = importlib.import_module("cloudcoil.models.prometheus_operator.v1")
    monitor = only(rendered["production"], "ServiceMonitor")
    parsed = crd.ServiceMonitor.model_validate(monitor)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == monitor
    # It scrapes the gateway's Service, on its named port, at the path the gateway serves metrics on.
    service = only(rendered["production"], "Service", RELEASE)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- the gateway's pods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["default", "production"])
def test_probes_ask_the_gateway_its_health_and_readiness(
    rendered: dict[str, list[Manifest]], config: str
) -> None:
    pod = container(gateway(rendered[config]), "gateway")
    assert pod["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert pod["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Loading the models (or exporting graphs the image lacks) must not be mistaken for a hung process.
    startup = pod["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("config", ["default", "production"])
def test_the_commands_are_icgates_own_and_read_the_mounted_policy(
    rendered: dict[str, list[Manifest]], config: str, tmp_path: Path
) -> None:
    manifests = rendered[config]
    deployment = gateway(manifests)
    pod = container(deployment, "gateway")
    args = build_parser().parse_args(pod["args"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8080)
    assert args.workers == {"default": 1, "production": 2}[config]

    # --policy names the file the policy ConfigMap is mounted as, read-only.
    mounts = {m["name"]: m for m in pod["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert mounts["policy"]["readOnly"] is True
    assert volumes["policy"]["configMap"]["name"] == f"{RELEASE}-policy"
    policy_map = only(manifests, "ConfigMap", f"{RELEASE}-policy")
    assert args.policy == Path(mounts["policy"]["mountPath"]) / "policy.yaml"
    assert list(policy_map["data"]) == ["policy.yaml"]
    # --data-dir is the writable scratch volume, seeded from the image by the init container.
    assert args.data_dir == Path(mounts["data"]["mountPath"])
    assert "emptyDir" in volumes["data"]
    seed = container(deployment, "seed-data")
    assert seed["command"][-1] == f"cp -a {args.data_dir}/. /seed/"

    # The gateway accepts the policy the chart ships (the same check as at start).
    policy = policy_in(policy_map, tmp_path)
    assert policy.backends and policy.database.url is None

    # The migration Job runs `icgate db upgrade` on the same policy text, mounted the same way.
    job = only(manifests, "Job")
    job_args = build_parser().parse_args(container(job, "migrate")["args"])
    assert (job_args.command, job_args.db_command, job_args.policy) == ("db", "upgrade", args.policy)
    job_map = only(manifests, "ConfigMap", f"{RELEASE}-migrations")
    assert job_map["data"] == policy_map["data"]


@pytest.mark.parametrize("config", ["default", "production"])
def test_termination_drains_in_flight_streams(
    rendered: dict[str, list[Manifest]], config: str, tmp_path: Path
) -> None:
    """SIGTERM comes after the preStop pause (the endpoint is gone by then); the gateway then drains for
    `server.graceful_shutdown_s` and cuts what is left within CUT_MARGIN_S; the grace period covers it all."""
    deployment = gateway(rendered[config])
    spec = deployment["spec"]["template"]["spec"]
    pod = container(deployment, "gateway")
    sleep = pod["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5
    drain = policy_in(only(rendered[config], "ConfigMap", f"{RELEASE}-policy"), tmp_path).server
    assert drain.graceful_shutdown_s == {"default": 30, "production": 60}[config]
    assert spec["terminationGracePeriodSeconds"] > int(sleep[1]) + drain.graceful_shutdown_s + CUT_MARGIN_S
    # A rolling update starts a new pod, ready, before an old one drains.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_a_changed_policy_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = gateway(render(values))["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/policy"])

    base = production()
    changed = copy.deepcopy(base)
    changed["policy"]["routed_models"] = ["auto", "fast"]
    assert checksum(base) == checksum(copy.deepcopy(base))
    assert checksum(base) != checksum(changed)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_container_has_resources_and_runs_unprivileged(
    rendered: dict[str, list[Manifest]], config: str
) -> None:
    seen = 0
    for where, spec in pod_specs(rendered[config]):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec["containers"] + spec.get("initContainers", []):
            resources = c["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), f"{where} {c['name']}"
            assert "memory" in resources["limits"], f"{where} {c['name']}"
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
            assert context["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
            assert context["capabilities"] == {"drop": ["ALL"]}
            seen += 1
    assert seen >= 3


# --- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["production-inline-secrets", "trial-with-redis"])
def test_secrets_are_never_outside_a_secret(rendered: dict[str, list[Manifest]], config: str) -> None:
    manifests = rendered[config]
    encoded = base64.b64encode(SENTINEL.encode()).decode()
    for m in manifests:
        text = yaml.safe_dump(m)
        if m["kind"] == "Secret":
            continue
        assert SENTINEL not in text, f"{m['kind']}/{m['metadata']['name']}"
        assert encoded not in text, f"{m['kind']}/{m['metadata']['name']}"
    # ...and they were rendered: in the Secrets, as the values given.
    secrets = [m for m in manifests if m["kind"] == "Secret"]
    decoded = [base64.b64decode(v).decode() for s in secrets for v in s["data"].values()]
    assert sum(SENTINEL in v for v in decoded) >= 4
    # The pods read them by reference only.
    for c in [container(gateway(manifests), "gateway")]:
        for e in c["env"]:
            assert SENTINEL not in str(e.get("value", ""))
        env = env_of(c)
        for name in ("ICGATE_DATABASE_URL", "ICGATE_REDIS_URL", "ICGATE_ADMIN_KEY", "OPENAI_API_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == RELEASE


def test_existing_secrets_are_referenced_not_copied(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["production"]
    assert "Secret" not in kinds(manifests)
    env = env_of(container(gateway(manifests), "gateway"))
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in env if "valueFrom" in env[name]}
    assert refs == {
        "ICGATE_DATABASE_URL": {"name": "icgate-database", "key": "url"},
        "ICGATE_REDIS_URL": {"name": "icgate-redis", "key": "url"},
        "ICGATE_ADMIN_KEY": {"name": "icgate-keys", "key": "admin-key", "optional": True},
        "OPENAI_API_KEY": {"name": "icgate-keys", "key": "OPENAI_API_KEY"},
    }


def test_the_redis_url_is_set_only_when_redis_is_configured(rendered: dict[str, list[Manifest]]) -> None:
    assert "ICGATE_REDIS_URL" not in env_of(container(gateway(rendered["default"]), "gateway"))
    assert not [m for m in rendered["default"] if m["metadata"]["name"].endswith("-redis")]
    trial = rendered["trial-with-redis"]
    env = env_of(container(gateway(trial), "gateway"))
    assert env["ICGATE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "redis-url"}
    secret = only(trial, "Secret", RELEASE)
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    assert url == f"redis://:{SENTINEL}@{RELEASE}-redis:6379/0"
    only(trial, "Deployment", f"{RELEASE}-redis")
    only(trial, "Service", f"{RELEASE}-redis")


def test_the_admin_key_goes_to_the_variable_the_policy_names() -> None:
    values = {"secret": {"adminKey": SENTINEL}, "policy": copy.deepcopy(CONFIGS["production"]["policy"])}
    values["policy"]["admin"] = {"key_env": "CONSOLE_KEY"}
    env = env_of(container(gateway(render(values)), "gateway"))
    assert "ICGATE_ADMIN_KEY" not in env
    assert env["CONSOLE_KEY"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "admin-key"}


# --- migrations --------------------------------------------------------------------------------------------


def referenced(spec: Manifest) -> set[tuple[str, str]]:
    """The ConfigMaps and Secrets a pod reads: (kind, name)."""
    refs = {("ConfigMap", v["configMap"]["name"]) for v in spec.get("volumes", []) if "configMap" in v}
    for c in spec["containers"]:
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                refs.add(("Secret", e["valueFrom"]["secretKeyRef"]["name"]))
    return refs


@pytest.mark.parametrize(
    ("config", "phases"),
    [
        ("production", {"pre-install", "pre-upgrade"}),
        ("production-inline-secrets", {"pre-install", "pre-upgrade"}),
        # The trial database is one of the release's own resources: it exists only after install.
        ("default", {"post-install", "pre-upgrade"}),
    ],
)
def test_migrations_run_as_a_hook_before_the_rollout(
    rendered: dict[str, list[Manifest]], config: str, phases: set[str]
) -> None:
    manifests = rendered[config]
    job = only(manifests, "Job")
    job_phases, job_weight, job_deletion = hook(job)
    assert job_phases == phases
    assert job_deletion == {"before-hook-creation", "hook-succeeded"}
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    assert "serviceAccountName" not in spec  # the chart's ServiceAccount does not exist before install

    # Everything the Job reads exists when it runs: a hook of the same phases with a lower weight, a
    # Secret the operator made beforehand, or (only after install) the release's own Secret.
    by_name = {(m["kind"], m["metadata"]["name"]): m for m in manifests}
    for kind, name in referenced(spec):
        resource = by_name.get((kind, name))
        if resource is None:
            assert config == "production" and name == "icgate-database"  # existingSecret
            continue
        phases_of, weight, deletion = hook(resource)
        if phases_of:
            assert phases_of == phases and weight < job_weight
            assert deletion == {"before-hook-creation", "hook-succeeded"}
        else:
            assert "pre-install" not in phases, f"{kind}/{name} does not exist yet before install"
    assert "ICGATE_DATABASE_URL" in env_of(spec["containers"][0])


# --- the two shapes: trial and production --------------------------------------------------------------


def test_production_runs_three_replicas_autoscaled_and_monitored(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["production"]
    # The autoscaler owns the replica count: the Deployment leaves it out, or every upgrade would reset it.
    assert "replicas" not in gateway(manifests)["spec"]
    hpa = only(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    only(manifests, "ServiceMonitor")
    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == gateway(manifests)["spec"]["selector"]["matchLabels"]
    ingress = only(manifests, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert not [m for m in manifests if m["kind"] == "StatefulSet"]
    # Without the autoscaler, the same values run exactly three.
    fixed = production()
    fixed["autoscaling"]["enabled"] = False
    assert gateway(render(fixed))["spec"]["replicas"] == 3


def test_the_default_is_a_trial_with_its_own_database(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["default"]
    assert gateway(manifests)["spec"]["replicas"] == 1
    assert not kinds(manifests) & {"HorizontalPodAutoscaler", "ServiceMonitor", "Ingress"}
    postgres = only(manifests, "StatefulSet", f"{RELEASE}-postgresql")
    assert container(postgres, "postgresql")["image"] == "postgres:16"
    env = env_of(container(gateway(manifests), "gateway"))
    assert env["ICGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "database-url"}
    secret = only(manifests, "Secret", RELEASE)
    url = base64.b64decode(secret["data"]["database-url"]).decode()
    password = base64.b64decode(secret["data"]["postgres-password"]).decode()
    assert len(password) == 32
    assert url == f"postgresql+psycopg://icgate:{password}@{RELEASE}-postgresql:5432/icgate"
