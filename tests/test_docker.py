"""Static checks of the container stack in docker/ (no Docker engine needed).

The compose file is read with ``yaml.safe_load`` and Compose-style ``${VAR...}``
interpolation is resolved here with the defaults written in the file, so the checks
see what ``docker compose config`` would produce with an empty environment.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
EXPECTED_SERVICES = {"postgres", "mlflow", "optuna-dashboard", "tuner", "trainer"}
WORKERS = ("tuner", "trainer")
LOOPBACK = {"127.0.0.1"}


# --------------------------------------------------------------------------- helpers


_INTERP = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def resolve(value, env: dict[str, str] | None = None):
    """Compose interpolation of a scalar: ``${V:-d}``/``${V-d}`` -> d, ``${V:?e}`` and
    ``${V}`` -> ``<V>`` (a placeholder) unless ``env`` sets V; ``$$`` -> ``$``."""
    if not isinstance(value, str):
        return value
    env = env or {}

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        return f"<{name}>"

    return _INTERP.sub(sub, value)


def command_args(service: dict) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(resolve(command))
    return [str(resolve(part)) for part in command]


def option_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(type, source, target) of each volume entry, short or long syntax, resolved."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append((entry.get("type", "volume"), str(resolve(entry.get("source", ""))),
                        str(entry["target"])))
            continue
        parts = resolve(entry).split(":")
        if len(parts) == 1:
            out.append(("volume", "", parts[0]))  # anonymous volume
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
        out.append((kind, source, target))
    return out


def parse_size(value) -> int:
    """Compose byte sizes: 67108864, "64m", "16gb", "1.5G"."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([\d.]+)\s*([bkmg]?)b?\s*", str(value).lower())
    assert match, f"unreadable size {value!r}"
    scale = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)]
    return int(float(match.group(1)) * scale)


def port_violations(ports) -> list[str]:
    """Entries of a service's ``ports:`` that would listen beyond 127.0.0.1.

    Short syntax must be ``127.0.0.1:HOST:CONTAINER[/proto]``; long syntax must carry
    ``host_ip: 127.0.0.1``. Anything else (``5000:5000``, ``5000``, ``0.0.0.0:...``)
    binds every interface and is reported.
    """
    bad = []
    for entry in ports or []:
        if isinstance(entry, dict):
            if str(resolve(entry.get("host_ip", ""))) not in LOOPBACK:
                bad.append(repr(entry))
            continue
        spec = str(resolve(str(entry))).split("/", 1)[0]
        if spec.startswith("["):  # [IPv6]:host:container
            host, _, rest = spec[1:].partition("]")
            ok = host in LOOPBACK and rest.count(":") == 2
        else:
            parts = spec.split(":")
            ok = len(parts) == 3 and parts[0] in LOOPBACK and all(parts[1:])
        if not ok:
            bad.append(repr(entry))
    return bad


_USERINFO = re.compile(r"://([^/@\s]*)@")
_ONE_REFERENCE = re.compile(r"\$?\$\{\w+(?::?[-?][^}]*)?\}")
_REFERENCE = re.compile(f"(?:{_ONE_REFERENCE.pattern})+")
_MARK = "\ue000"  # stands for one ${VAR...} reference while URLs are scanned
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD", re.I)


def _strings(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def literal_credentials(compose: dict) -> list[str]:
    """Places where a compose document holds a credential that is not a ${VAR} reference."""
    found = []
    for path, text in _strings(compose):
        # References may hold ':' '/' '@' or spaces (${V:?set it in docker/.env}):
        # replace them first, then every user:password@ must be made of references only.
        masked = _ONE_REFERENCE.sub(_MARK, text)
        for userinfo in _USERINFO.findall(masked):
            literal = userinfo.replace(_MARK, "").replace(":", "", 1)
            if literal:
                found.append(f"{path}: URL credential {literal!r} in {userinfo!r}")
        if re.search(r"\$\{\w*PASSWORD\w*:?-", text):
            found.append(f"{path}: password with a default value")
    for name, service in (compose.get("services") or {}).items():
        for key, value in environment(service).items():
            if _SECRET_KEY.search(key) and value and not _REFERENCE.fullmatch(value):
                found.append(f"services.{name}.environment.{key}: literal {value!r}")
    return found


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    instructions, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, rest = buffer.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        buffer = ""
    return instructions


def build_dockerfile(service: dict) -> str:
    """Text of the Dockerfile a service builds (file or dockerfile_inline)."""
    build = service.get("build")
    assert build, "service has no build section"
    if isinstance(build, str):
        build = {"context": build}
    if "dockerfile_inline" in build:
        return build["dockerfile_inline"]
    context = (DOCKER / build.get("context", ".")).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).read_text()


def gitignored(path: str, gitignore: Path) -> bool:
    ignored = False
    for line in gitignore.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if "/" in pattern.lstrip("/"):
            hit = fnmatch(path, pattern.lstrip("/")) or fnmatch(path, pattern.replace("**/", ""))
        else:
            hit = any(fnmatch(part, pattern) for part in path.split("/"))
        if hit:
            ignored = not negate
    return ignored


def database_url(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.path.lstrip("/")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# ------------------------------------------------------------------------------ tests


def test_expected_services_exist(services):
    assert EXPECTED_SERVICES <= set(services), EXPECTED_SERVICES - set(services)


def test_services_share_one_user_defined_network(compose, services):
    declared = set(compose.get("networks") or {})
    assert len(declared) == 1, f"expected one user-defined network, got {declared}"
    (network,) = declared
    for name in EXPECTED_SERVICES:
        service = services[name]
        assert "network_mode" not in service, f"{name} leaves the network"
        nets = service.get("networks") or []
        assert network in nets, f"{name} is not on network {network!r}"


def test_named_volumes_declared_and_used(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for kind, source, target in mounts(service):
            if kind == "volume" and source:
                assert source in declared, f"{name}: volume {source!r} is not declared"

    pg = {target: source for kind, source, target in mounts(services["postgres"])
          if kind == "volume"}
    assert pg.get("/var/lib/postgresql/data") in declared, "postgres data not on a named volume"

    destination = option_value(command_args(services["mlflow"]), "--artifacts-destination")
    assert destination and destination.startswith("/"), "mlflow needs a local artifacts path"
    ml = {target: source for kind, source, target in mounts(services["mlflow"])
          if kind == "volume"}
    assert ml.get(destination) in declared, "mlflow artifacts not on a named volume"
    assert pg[("/var/lib/postgresql/data")] != ml[destination]


def test_postgres_healthcheck_gates_its_clients(services):
    check = services["postgres"].get("healthcheck") or {}
    assert check.get("test") and not check.get("disable"), "postgres has no healthcheck"
    test = check["test"] if isinstance(check["test"], str) else " ".join(check["test"])
    assert "NONE" not in test.split()
    for name in ("mlflow", "optuna-dashboard", "tuner"):
        depends = services[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert (depends.get("postgres") or {}).get("condition") == "service_healthy", name


def test_init_script_creates_both_databases(services):
    init_dirs = [source for kind, source, target in mounts(services["postgres"])
                 if target == "/docker-entrypoint-initdb.d"]
    assert init_dirs, "postgres does not mount an init directory"
    init_dir = (DOCKER / init_dirs[0]).resolve()
    scripts = sorted(init_dir.glob("*.sql")) + sorted(init_dir.glob("*.sh"))
    assert scripts, f"no init script in {init_dir}"
    created = set()
    for script in scripts:
        created |= set(re.findall(r"CREATE\s+DATABASE\s+\"?(\w+)", script.read_text(), re.I))
    assert {"mlflow", "optuna"} <= created, created


def test_mlflow_and_optuna_use_different_databases(services):
    backend = option_value(command_args(services["mlflow"]), "--backend-store-uri")
    assert backend, "mlflow server has no --backend-store-uri"
    ml_scheme, ml_host, ml_db = database_url(backend)
    assert (ml_host, ml_db) == ("postgres", "mlflow"), backend

    storages = [environment(services[w]).get("SSOD_OPTUNA_STORAGE", "") for w in WORKERS]
    storages.append(next((a for a in command_args(services["optuna-dashboard"])
                          if a.startswith("postgresql")), ""))
    for storage in storages:
        scheme, host, db = database_url(resolve(storage))
        assert (host, db) == ("postgres", "optuna"), storage
        assert db != ml_db
        # psycopg2 is what the images install; SQLAlchemy 2.1 maps a bare
        # postgresql:// to psycopg 3.
        assert scheme == "postgresql+psycopg2", storage
    assert ml_scheme == "postgresql+psycopg2", backend


def test_workers_track_to_the_mlflow_service(services):
    mlflow_args = command_args(services["mlflow"])
    port = option_value(mlflow_args, "--port") or "5000"
    assert option_value(mlflow_args, "--host") == "0.0.0.0", "other containers must reach it"
    for name in WORKERS:
        uri = resolve(environment(services[name]).get("MLFLOW_TRACKING_URI", ""))
        assert uri == f"http://mlflow:{port}", f"{name}: {uri!r}"


def test_mlflow_allowed_hosts_lists_the_service_name(services):
    value = option_value(command_args(services["mlflow"]), "--allowed-hosts")
    assert value, "without --allowed-hosts the server answers 403 to http://mlflow:5000"
    hosts = [h.strip() for h in value.split(",") if h.strip()]
    for header in ("mlflow", "mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
        assert any(fnmatch(header, h) if "*" in h else header == h for h in hosts), header
    assert "*" not in hosts, "allowing every host defeats the check"


def test_server_images_install_psycopg2(services):
    mlflow_dockerfile = build_dockerfile(services["mlflow"])
    assert re.search(r"pip install[^\n]*psycopg2", mlflow_dockerfile), "mlflow image lacks psycopg2"
    assert re.search(r"mlflow==\$\{MLFLOW_VERSION\}|mlflow==3\.17", mlflow_dockerfile)
    version = re.search(r"ARG MLFLOW_VERSION=(\S+)", mlflow_dockerfile)
    assert version is None or version.group(1).startswith("3.17"), version
    assert re.search(r"pip install[^\n]*psycopg2", build_dockerfile(services["optuna-dashboard"]))


def _gpu_reservations(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]


@pytest.mark.parametrize("name", WORKERS)
def test_workers_reserve_gpus_only_with_the_gpu_file_and_have_enough_shm(services, name):
    """A CPU host has no NVIDIA runtime: the main file reserves no GPU (a CPU tuner starts
    there); docker-compose.gpu.yml, added after it, reserves them for both workers."""
    service = services[name]
    assert _gpu_reservations(service) == [], f"{name}: a GPU reservation in the main file fails on a CPU host"
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())
    assert set(gpu["services"]) == set(WORKERS)
    merged = {**service, **gpu["services"][name]}  # compose merges a service's keys, the later file's win
    assert _gpu_reservations(merged), f"{name}: no nvidia GPU reservation with docker-compose.gpu.yml"
    assert "shm_size" in service, f"{name}: Docker's 64 MB /dev/shm breaks DataLoader workers"
    assert parse_size(resolve(service["shm_size"])) >= 2**30


def test_the_tuner_runs_on_the_cpu_unless_told_its_gpus(services):
    tuner = command_args(services["tuner"])
    assert option_value(tuner, "--gpus") == "cpu", tuner
    example = _env_example()
    assert example["SSOD_TUNE_GPUS"] == "cpu"


def test_the_dashboard_uses_the_workers_optuna_and_has_a_healthcheck(services):
    constraints = (DOCKER / "constraints.txt").read_text()
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", constraints, re.M))
    assert "optuna" in pins and "optuna-dashboard" in pins, constraints
    dashboard = build_dockerfile(services["optuna-dashboard"])
    worker = (DOCKER / "Dockerfile").read_text()
    for name, text in (("optuna-dashboard", dashboard), ("workers", worker)):
        assert "COPY docker/constraints.txt /tmp/constraints.txt" in text, name
        assert re.search(r"pip install -c /tmp/constraints.txt [^\n]*optuna", text) or (
            name == "workers" and "pip install -c /tmp/constraints.txt -e \".[tune]\"" in text), name
    test = services["optuna-dashboard"].get("healthcheck", {}).get("test") or []
    assert any("/api/meta" in str(part) for part in test), test


def test_worker_commands(services):
    tuner = command_args(services["tuner"])
    assert tuner[:1] == ["ssod-tune"] and "--workers" in tuner and "--gpus" in tuner, tuner
    assert not services["tuner"].get("profiles"), "the tuner starts with a plain `up`"

    trainer = command_args(services["trainer"])
    assert trainer[:2] == ["accelerate", "launch"] and "--multi_gpu" in trainer, trainer
    assert option_value(trainer, "-m") == "ssod.train", trainer
    assert "train.resume=auto" in trainer, "a restarted trainer container must continue its run"
    assert "train" in (services["trainer"].get("profiles") or []), "trainer must be on request"


def test_every_published_port_binds_loopback(services):
    published = {name: s.get("ports") for name, s in services.items() if s.get("ports")}
    assert {"mlflow", "optuna-dashboard"} <= set(published)
    for name, ports in published.items():
        assert port_violations(ports) == [], name


@pytest.mark.parametrize("entry", [
    "0.0.0.0:5000:5000",
    "5000:5000",
    "5000",
    "${MLFLOW_PORT:-5000}:5000",
    "192.168.1.10:5432:5432/tcp",
    "[::]:5000:5000",
    {"target": 5000, "published": 5000},
    {"target": 5000, "published": "5000", "host_ip": "0.0.0.0"},
])
def test_port_checker_rejects_public_bindings(entry):
    assert port_violations([entry]) == [repr(entry)]


@pytest.mark.parametrize("entry", [
    "127.0.0.1:5000:5000",
    "127.0.0.1:${MLFLOW_PORT:-5000}:5000",
    "127.0.0.1:8080:8080/tcp",
    {"target": 5000, "published": "5000", "host_ip": "127.0.0.1"},
])
def test_port_checker_accepts_loopback(entry):
    assert port_violations([entry]) == []


def test_no_literal_credentials_in_compose(compose):
    assert literal_credentials(compose) == []
    text = COMPOSE.read_text()
    assert "${POSTGRES_PASSWORD:?" in text, "the password must be required, without default"
    # The example leaves it empty, and every use requires a non-empty value (`:?`), so a
    # copied .env.example does not start with a password everyone knows.
    assert _env_example()["POSTGRES_PASSWORD"] == ""
    uses = re.findall(r"(?<!\$)\$\{POSTGRES_PASSWORD([^}]*)\}", text)  # not $${...}: the container's own
    assert uses and all(use.startswith(":?") for use in uses), uses


def _env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_credential_checker_rejects_literals():
    leaky = {"services": {
        "db": {"environment": {"POSTGRES_PASSWORD": "hunter2"}},
        "app": {"command": ["x", "postgresql://ssod:hunter2@postgres:5432/mlflow"]},
        "web": {"environment": ["DB_PASSWORD=${DB_PASSWORD:-hunter2}"]},
    }}
    found = literal_credentials(leaky)
    assert any("POSTGRES_PASSWORD" in f for f in found)
    assert any("hunter2" in f and "command" in f for f in found)
    assert any("default" in f for f in found)
    clean = {"services": {"db": {
        "environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}"},
        "command": ["postgresql+psycopg2://${U:-ssod}:${POSTGRES_PASSWORD:?x}@db/optuna"],
    }}}
    assert literal_credentials(clean) == []


def test_env_file_is_ignored_and_example_exists():
    example = DOCKER / ".env.example"
    assert example.is_file()
    assert re.search(r"^POSTGRES_PASSWORD=", example.read_text(), re.M)
    assert re.search(r"^POSTGRES_USER=", example.read_text(), re.M)
    assert gitignored("docker/.env", ROOT / ".gitignore"), ".gitignore misses docker/.env"
    assert not gitignored("docker/.env.example", ROOT / ".gitignore")
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():  # read-only cross-check with git itself
        result = subprocess.run([git, "check-ignore", "-q", "docker/.env"], cwd=ROOT)
        assert result.returncode == 0, "git does not ignore docker/.env"


def test_dockerignore_keeps_secrets_and_environments_out():
    for service in ("tuner", "trainer", "mlflow"):
        build = yaml.safe_load(COMPOSE.read_text())["services"][service]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT, f"{service}: context is not the root"
    ignore = ROOT / ".dockerignore"
    assert ignore.is_file(), "build context is the repo root: it needs a root .dockerignore"
    for path in ("docker/.env", ".env", ".venv", ".git", "mlflow.db", "mlartifacts", "outputs"):
        assert gitignored(path, ignore), f".dockerignore lets {path} into the context"


def test_worker_dockerfile_installs_package_as_non_root(services):
    build = services["tuner"]["build"]
    assert build == services["trainer"]["build"]
    dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == DOCKER / "Dockerfile"
    steps = dockerfile_instructions(dockerfile)
    args = {k: v for kind, text in steps if kind == "ARG" and "=" in text
            for k, v in [text.split("=", 1)]}
    base = next(text for kind, text in steps if kind == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), base)
    assert "cuda" in base.lower(), f"not a CUDA base image: {base}"

    runs = " ".join(text for kind, text in steps if kind == "RUN")
    pip_installs = [c for c in re.split(r"&&|;|\|\|", runs) if "pip install" in c]
    # the extras' dependencies must really be installed: not only with --no-deps
    assert any(re.search(r"\.\[(?:[\w,]*,)?tune\b", c) and "--no-deps" not in c
               for c in pip_installs), "package not installed with its [tune] extras"
    assert any("psycopg2-binary" in c for c in pip_installs)
    env = " ".join(text for kind, text in steps if kind == "ENV")
    for var in ("PYTHONUNBUFFERED", "SSOD_CACHE_DIR", "TORCH_HOME", "HF_HOME"):
        assert var in env, var
    assert "PIP_NO_CACHE_DIR=1" in env or "--no-cache-dir" in runs, "pip cache not off"

    users = [text.split(":")[0] for kind, text in steps if kind == "USER"]
    assert users and users[-1] not in {"root", "0"}, "image runs as root"
    assert any(kind == "CMD" for kind, _ in steps)


def test_mlflow_dockerfile_runs_as_non_root():
    steps = dockerfile_instructions(DOCKER / "mlflow.Dockerfile")
    users = [text.split(":")[0] for kind, text in steps if kind == "USER"]
    assert users and users[-1] not in {"root", "0"}
