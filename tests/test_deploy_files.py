"""Deployment files: docker/ (Dockerfile, compose.yaml), cluster/cluster.yaml, cluster/kuberay/.

No Docker engine, cloud or Kubernetes here: these tests check what can be checked offline. The files
parse; the image installs the pinned stack with the Makefile's own steps; image name, ports, auth and
MLflow address agree across compose, the cluster launcher YAML and the KubeRay manifests;
cluster.yaml passes Ray's own validation (`prepare_config` + `validate_config` against
ray-schema.json, what `ray up` runs before touching the cloud); the commands the files run parse with
our CLI and name files that exist.
"""

import copy
import re
import shlex

import pytest
import yaml

from s3_ray.cli import build_parser

from .search_helpers import ROOT

DOCKER, CLUSTER, KUBERAY = ROOT / "docker", ROOT / "cluster", ROOT / "cluster" / "kuberay"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "(.+)"$', PYPROJECT, re.M)[1]
IMAGE = f"s3-ray:{VERSION}"
RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
MLFLOW_PORT = 5000
# MLflow's backend store in compose and on Kubernetes: the official image of the PostgreSQL major version
# tests/test_postgres_tracking.py runs against (Debian 12's package)
POSTGRES_IMAGE, POSTGRES_PORT = "postgres:15", 5432


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def cluster():
    return yaml.safe_load((CLUSTER / "cluster.yaml").read_text())


def kube(name):
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def walk(obj, key):
    """Every value stored under ``key`` anywhere in a parsed YAML document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v, key)


def s3_args(argv):
    """Parse an ``s3 ...`` command line with our own CLI parser (a typo fails here, not on a cluster)."""
    argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
    assert argv[0] == "s3", argv
    return build_parser().parse_args(argv[1:])


def backend_uri(args):
    """The parsed ``--backend-store-uri`` of an ``s3 mlflow-server`` command: a PostgreSQL URL with no password."""
    from sqlalchemy.engine import make_url

    from s3_ray.tracking.server import BACKEND_SCHEMES, redact

    assert args.backend_store_uri, "the shared MLflow server should use PostgreSQL (--backend-store-uri)"
    url = make_url(args.backend_store_uri)
    assert url.drivername in BACKEND_SCHEMES and url.drivername.startswith("postgresql"), url
    assert url.password is None and redact(args.backend_store_uri) == args.backend_store_uri, \
        "the password must come from PGPASSWORD (a secret), not from the command line"
    return url


def in_image(path: str):
    """A path inside the image (/app/...) -> the repository file it was copied from."""
    assert path.startswith("/app/"), path
    return ROOT / path.removeprefix("/app/")


# ---- Dockerfile -----------------------------------------------------------------------------------

def dockerfile_runs() -> list[str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return [" ".join(line.split()[1:]) for line in text.splitlines() if line.startswith("RUN ")]


def makefile_setup() -> list[str]:
    """The recipe of the Makefile's setup stamp, with its variables expanded."""
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("$(STAMP): pyproject.toml\n", 1)[1]
    lines = []
    for line in recipe.splitlines():
        if not line.startswith("\t"):
            break
        lines.append(line.strip().replace("$(BIN)", ".venv/bin").replace("$(VENV)", ".venv").replace("$(PY)", "python3")
                     .replace("$(STAMP)", ".venv/.installed"))
    return lines


def test_dockerfile_installs_like_make_setup():
    runs, setup = dockerfile_runs(), makefile_setup()
    pips = [c for c in setup if " install " in c]
    assert len(pips) == 2 and "torch==" in pips[0] and "-e '.[dev]'" in pips[1]
    # every install command of `make setup`, verbatim, in the same order
    positions = [next((i for i, r in enumerate(runs) if cmd in r), None) for cmd in pips]
    assert None not in positions and positions == sorted(positions), (pips, runs)
    assert any("python3 -m venv .venv" in r for r in runs) and "python3 -m venv .venv" in setup[0]
    assert any("touch .venv/.installed" in r for r in runs) and "touch .venv/.installed" in setup
    # the torch pins of the Makefile are the ones of pyproject.toml
    for pin in re.findall(r"(torch(?:vision)?==[\w.]+)", pips[0]):
        assert f'"{pin}"' in PYPROJECT


def test_dockerfile_base_workdir_and_copies():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+)\.(\d+)", text, re.M)
    assert base and (int(base[1]), int(base[2])) >= (3, 10)  # requires-python >= 3.10
    assert "WORKDIR /app" in text and "ENV PATH=/app/.venv/bin:$PATH" in text
    assert "RAY_USAGE_STATS_ENABLED=0" in text and "MLFLOW_DISABLE_TELEMETRY=true" in text  # no usage data out
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image should not run as root"
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for src in line.split():
            assert (ROOT / src).exists(), f"Dockerfile copies a missing path: {src}"
    ports = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M)[1].split()}
    assert ports == {MLFLOW_PORT, *RAY_PORTS.values()}
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore


# ---- compose --------------------------------------------------------------------------------------

def test_compose_services_image_ports_health():
    c = compose()
    s = c["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-gpu"} <= set(s)
    assert {svc["image"] for n, svc in s.items() if n != "postgres"} == {IMAGE}
    assert s["postgres"]["image"] == POSTGRES_IMAGE
    assert s["mlflow"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    # published ports: only on the host's loopback
    for name, svc in s.items():
        for p in svc.get("ports", []):
            assert p.startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
    assert s["mlflow"]["ports"] == [f"127.0.0.1:{MLFLOW_PORT}:{MLFLOW_PORT}"]
    assert set(s["ray-head"]["ports"]) == {f"127.0.0.1:{p}:{p}" for p in (RAY_PORTS["dashboard"], RAY_PORTS["client"])}
    head = " ".join(s["ray-head"]["command"])
    assert f"--port={RAY_PORTS['gcs-server']}" in head and f"--dashboard-port={RAY_PORTS['dashboard']}" in head
    assert f"--ray-client-server-port={RAY_PORTS['client']}" in head and "--head" in head
    for w in ("ray-worker", "ray-worker-gpu"):
        assert f"--address=ray-head:{RAY_PORTS['gcs-server']}" in s[w]["command"]
        assert s[w]["depends_on"]["ray-head"]["condition"] == "service_healthy"
        assert "runs:/runs" in s[w]["volumes"]
    assert "runs:/runs" in s["ray-head"]["volumes"]
    # health checks: MLflow /health, the head's /api/gcs_healthz, each worker's raylet
    health = {n: " ".join(svc["healthcheck"]["test"]) for n, svc in s.items()}
    assert f"127.0.0.1:{MLFLOW_PORT}/health" in health["mlflow"]
    assert f"127.0.0.1:{RAY_PORTS['dashboard']}/api/gcs_healthz" in health["ray-head"]
    assert "/api/local_raylet_healthz" in health["ray-worker"] and "/api/local_raylet_healthz" in health["ray-worker-gpu"]
    assert health["postgres"].startswith("CMD pg_isready -h 127.0.0.1")  # the real server, not initdb's socket-only one
    # token auth on every Ray node; the GPU worker reserves NVIDIA devices and is opt-in
    for n in ("ray-head", "ray-worker", "ray-worker-gpu"):
        env = s[n]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env["RAY_AUTH_TOKEN"]
    gpu = s["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert set(c["volumes"]) == {"runs", "mlflow", "postgres"}
    # named volumes are mounted on directories the image creates for its non-root user (else root-owned)
    made = re.search(r"mkdir -p ([^&]+)&& chown ray:ray", (DOCKER / "Dockerfile").read_text().replace("\\\n", " "))
    for svc in (svc for svc in s.values() if svc["image"] == IMAGE):
        for v in svc.get("volumes", []):
            name, path = v.split(":")[:2]
            if name in c["volumes"]:
                assert path in made[1].split(), f"{path} is not created in the image"


def test_compose_mlflow_command_is_ours():
    cmd = compose()["services"]["mlflow"]["command"]
    a = s3_args(cmd)
    assert a.cmd == "mlflow-server" and a.port == MLFLOW_PORT and a.host == "0.0.0.0"
    # other containers call it http://mlflow:5000: that Host header must be allowed
    assert f"mlflow:{MLFLOW_PORT}" in a.allowed_hosts.split(",")


def test_compose_mlflow_stores_runs_in_postgres():
    s = compose()["services"]
    pg, mlflow = s["postgres"], s["mlflow"]
    url = backend_uri(s3_args(mlflow["command"]))
    # the URI names the postgres service, its port, and the user and database the image creates
    assert (url.host, url.port) == ("postgres", POSTGRES_PORT)
    assert url.username == pg["environment"]["POSTGRES_USER"] and url.database == pg["environment"]["POSTGRES_DB"]
    # one password, from the environment of `docker compose` (never written in the file): PostgreSQL sets it,
    # MLflow's libpq reads it as PGPASSWORD
    var = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", pg["environment"]["POSTGRES_PASSWORD"])
    assert var, pg["environment"]["POSTGRES_PASSWORD"]
    assert mlflow["environment"]["PGPASSWORD"] == pg["environment"]["POSTGRES_PASSWORD"]
    assert var[1] in (DOCKER / "README.md").read_text() and var[1] in (DOCKER / "compose.yaml").read_text().split("\n\n")[0]
    # MLflow starts once the database accepts connections (s3 mlflow-server connects to it first); the
    # database is not published on the host and keeps its data on a named volume
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in pg and "postgres:/var/lib/postgresql/data" in pg["volumes"]
    assert "mlflow:/mlflow" in mlflow["volumes"]  # the artifacts
    assert s["ray-head"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


# ---- cluster launcher -----------------------------------------------------------------------------

def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster()
    prepared = prepare_config(copy.deepcopy(cfg))  # defaults filled in as `ray up` does, offline
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws" and prepared["docker"]["image"] == IMAGE
    # our commands replaced the provider's defaults (which would pip-install another Ray)
    assert not any("ray-wheels" in c for c in prepared["setup_commands"] + prepared["head_setup_commands"])
    types = prepared["available_node_types"]
    head, workers = types[prepared["head_node_type"]], [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert head["max_workers"] == 0 and any(w["resources"].get("GPU", 0) >= 1 for w in workers)
    # and the validation is real: a misspelt key is refused
    import jsonschema

    bad = copy.deepcopy(prepared)
    bad["head_start_ray_command"] = bad.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_cluster_yaml_ports_auth_and_mounts():
    cfg = cluster()
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert f"--port={RAY_PORTS['gcs-server']}" in head and f"--dashboard-port={RAY_PORTS['dashboard']}" in head
    assert f"--ray-client-server-port={RAY_PORTS['client']}" in head
    assert f"--address=$RAY_HEAD_IP:{RAY_PORTS['gcs-server']}" in worker
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in worker
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for remote, local in cfg["file_mounts"].items():
        if not local.startswith("~"):
            assert (ROOT / local).exists() and (remote.startswith("/app/") and in_image(remote).exists())
    assert any(o.endswith(":/runs") for o in cfg["docker"]["run_options"])


# ---- KubeRay --------------------------------------------------------------------------------------

def _containers(spec):
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_ray_cluster_spec(spec):
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]} == RAY_PORTS
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert {c["image"] for c in _containers(spec)} == {IMAGE}
    gpu = [g for g in spec["workerGroupSpecs"] if any("nvidia.com/gpu" in c["resources"]["limits"]
                                                        for c in g["template"]["spec"]["containers"])]
    assert gpu, "no GPU worker group"
    for c in _containers(spec):  # every Ray pod shares the run directory (Tune's storage_path)
        assert any(m["mountPath"] == "/runs" for m in c["volumeMounts"])


def test_kuberay_raycluster():
    (rc,) = kube("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_ray_cluster_spec(rc["spec"])


def test_kuberay_rayjob_runs_our_search():
    (job,) = kube("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    a = s3_args(spec["entrypoint"])
    assert a.cmd == "search" and in_image(a.space).is_file() and a.runs == "/runs"
    assert a.mlflow_uri == f"http://mlflow:{MLFLOW_PORT}"
    from s3_ray.config import load_config

    cfg = load_config(in_image(a.space))
    assert cfg.resources.gpu > 0  # the GPU space


def _mlflow_docs():
    docs = kube("mlflow.yaml")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by) == len(docs)
    return by


def _selects(svc, workload):
    """The Service's selector picks the workload's pods (and the workload's own selector matches them too)."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return svc["spec"]["selector"].items() <= labels.items()


def _secret_env(container, name):
    (e,) = [e for e in container["env"] if e["name"] == name]
    assert "value" not in e, f"{name} is written in the manifest"
    ref = e["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_kuberay_mlflow_and_storage():
    by = _mlflow_docs()
    assert set(by) == {("PersistentVolumeClaim", "s3-mlflow"), ("Deployment", "mlflow"), ("Service", "mlflow"),
                       ("StatefulSet", "mlflow-postgres"), ("Service", "mlflow-postgres")}
    svc, dep = by["Service", "mlflow"], by["Deployment", "mlflow"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"][0]["port"] == MLFLOW_PORT and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == IMAGE and c["ports"][0]["containerPort"] == MLFLOW_PORT
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": MLFLOW_PORT}
    a = s3_args(c["command"])
    assert a.cmd == "mlflow-server" and a.port == MLFLOW_PORT and f"mlflow:{MLFLOW_PORT}" in a.allowed_hosts.split(",")
    assert dep["spec"]["replicas"] == 1  # its artifacts volume is ReadWriteOnce
    claims = {d["metadata"]["name"]: d for d in kube("storage.yaml")}
    assert claims["s3-runs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    used = {vol["persistentVolumeClaim"]["claimName"] for f in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml")
            for d in kube(f) for vols in walk(d, "volumes") for vol in vols if "persistentVolumeClaim" in vol}
    assert used == set(claims) | {"s3-mlflow"}


def test_kuberay_mlflow_stores_runs_in_postgres():
    by = _mlflow_docs()
    dep, sts, pg_svc = by["Deployment", "mlflow"], by["StatefulSet", "mlflow-postgres"], by["Service", "mlflow-postgres"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    url = backend_uri(s3_args(c["command"]))
    # the URI names the PostgreSQL Service and port; the Service selects the StatefulSet's pod, which
    # listens there; user and database are the ones the image creates
    assert (url.host, url.port) == (pg_svc["metadata"]["name"], POSTGRES_PORT)
    assert pg_svc["spec"]["type"] == "ClusterIP" and pg_svc["spec"]["ports"][0]["port"] == POSTGRES_PORT
    assert _selects(pg_svc, sts) and not _selects(by["Service", "mlflow"], sts) and not _selects(pg_svc, dep)
    assert sts["spec"]["serviceName"] == pg_svc["metadata"]["name"] and sts["spec"]["replicas"] == 1
    (pg,) = sts["spec"]["template"]["spec"]["containers"]
    assert pg["image"] == POSTGRES_IMAGE and pg["ports"][0]["containerPort"] == POSTGRES_PORT
    env = {e["name"]: e.get("value") for e in pg["env"]}
    assert (url.username, url.database) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    # one password, in a Secret that no file here holds: PostgreSQL sets it, MLflow's libpq reads PGPASSWORD
    secret = _secret_env(pg, "POSTGRES_PASSWORD")
    assert _secret_env(c, "PGPASSWORD") == secret
    for f in KUBERAY.glob("*.yaml"):
        assert not any(d["kind"] == "Secret" for d in kube(f.name)), f"{f.name} holds a Secret"
    assert f"kubectl create secret generic {secret[0]} --from-literal={secret[1]}=" in \
        " ".join((KUBERAY / "mlflow.yaml").read_text().replace("\\\n#", " ").split())
    # its data on a volume of its own (PGDATA below the mount point: a fresh volume holds lost+found)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (mount,) = [m for m in pg["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert env["PGDATA"].startswith(mount["mountPath"] + "/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert pg[probe]["exec"]["command"][:3] == ["pg_isready", "-h", "127.0.0.1"]
    # MLflow waits for the database (s3 mlflow-server exits at once if it cannot connect)
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == POSTGRES_IMAGE and f"pg_isready -h {url.host} -p {url.port}" in " ".join(init["command"])


def test_one_image_everywhere():
    images = {*(svc["image"] for svc in compose()["services"].values()), cluster()["docker"]["image"]}
    for f in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml"):
        images |= {i for d in kube(f) for i in walk(d, "image")}
    assert images == {IMAGE, POSTGRES_IMAGE}  # ours, and MLflow's database
    assert f"-t {IMAGE}" in (DOCKER / "Dockerfile").read_text() and IMAGE in (DOCKER / "README.md").read_text()
