"""Deployment files: the Compose files are valid, the image's commands exist and are documented,
and the image runs unprivileged without data, checkpoints or wheels.

Nothing is built or started here (``tests/test_compose.py`` runs the CPU stack on a Docker
engine): the Compose files are checked against the Compose specification's JSON schema (vendored
by ``check-jsonschema``) and, where Debian's ``docker-compose`` is installed (``.ci/run`` installs
it), by ``docker-compose config``. The GPU stack (``docker-compose.yml`` with
``docker-compose.override.yml``) is only checked here: it needs an NVIDIA GPU and the NVIDIA
Container Toolkit, which CI machines do not have.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_GPU = ROOT / "docker-compose.override.yml"  # read by a plain `docker compose up`
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = [ROOT / "README.md", ROOT / "docs" / "deployment.md"]
CHECKPOINT = "/runs/quickstart/best.pt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class _Reset:
    """Compose's ``!reset`` tag: the value replaces, rather than merges with, the base file's."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    if isinstance(node, yaml.SequenceNode):
        return _Reset(loader.construct_sequence(node))
    if isinstance(node, yaml.MappingNode):
        return _Reset(loader.construct_mapping(node))
    return _Reset(None)


_ComposeLoader.add_constructor("!reset", _reset)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of ``-f base -f override`` for what these files use: mappings merge key
    by key, ``!reset`` replaces, anything else in the override wins."""
    if isinstance(override, _Reset):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value) if key in base else resolve(value)
        return merged
    return resolve(override)


def resolve(value: Any) -> Any:
    if isinstance(value, _Reset):
        return value.value
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    return value


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}``, and the shell's for ``$${VAR:-default}`` (Compose passes
    ``$$`` on as ``$``), with nothing set in the environment."""
    return re.sub(r"\$?\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The GPU stack: what a plain ``docker compose up`` reads."""
    return merge(load_compose(COMPOSE), load_compose(COMPOSE_GPU))


@pytest.fixture(scope="module")
def compose_cpu() -> dict[str, Any]:
    """``-f docker-compose.yml -f docker-compose.cpu.yml``: the GPU override is left out."""
    return merge(load_compose(COMPOSE), load_compose(COMPOSE_CPU))


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def schema_errors(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# -- the Compose files are valid -----------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose, compose_schema):
    assert schema_errors(load_compose(COMPOSE), compose_schema) == []
    assert schema_errors(compose, compose_schema) == []


def test_override_files_need_no_compose_v2_tags():
    """Debian's docker-compose (v1.29) reads none of Compose v2's YAML tags (``!reset``,
    ``!override``): the CPU stack is the base file plus an override that only adds."""
    for path in (COMPOSE, COMPOSE_GPU, COMPOSE_CPU):
        assert not re.search(r"!\w", path.read_text()), path.name


def test_cpu_override_merged_follows_the_compose_specification(compose_cpu, compose_schema):
    assert schema_errors(compose_cpu, compose_schema) == []


def test_schema_validation_can_fail(compose, compose_schema):
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    broken["services"]["api"]["healthcheck"]["retries"] = "three"
    errors = schema_errors(broken, compose_schema)
    assert len(errors) == 2, errors


def docker_compose_config(tmp_path: Path, document: dict[str, Any], *args: str) -> str:
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (.ci/run installs it)")
    # A copy of the file at the repository root, so that `build: .` points at the project.
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(
        ["docker-compose", "--project-directory", str(ROOT), "-f", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_docker_compose_config_accepts_the_gpu_stack(tmp_path):
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (.ci/run installs it)")
    result = subprocess.run(
        ["docker-compose", "config"],  # a plain `up` reads docker-compose.override.yml too
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["train"]["profiles"] == ["train"]
    assert "profiles" not in resolved["services"]["api"]  # started by a plain `up`
    devices = resolved["services"]["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "count": 1, "driver": "nvidia"}]
    profiles = subprocess.run(
        [
            "docker-compose",
            "--profile",
            "train",
            "--profile",
            "tensorboard",
            "config",
            "--services",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    # `config --services` lists the services of every profile here, ray included.
    assert sorted(profiles.stdout.split()) == [
        "api",
        "ray-head",
        "ray-worker",
        "tensorboard",
        "train",
        "trainer",
    ]


def test_docker_compose_config_accepts_the_cpu_stack():
    """The real files, as the README runs them: no GPU reservation is left anywhere."""
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (.ci/run installs it)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "-f", str(COMPOSE_CPU), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["api"]["environment"]["SATSEG_DEVICE"] == "cpu"
    assert "deploy" not in services["api"] and "deploy" not in services["trainer"]
    assert services["api"]["image"] == "satseg:cpu"


def test_docker_compose_config_rejects_a_broken_file(tmp_path, compose):
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (.ci/run installs it)")
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["trainer"]["condition"] = "service_finished"
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        ["docker-compose", "--project-directory", str(ROOT), "-f", str(path), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "condition" in result.stderr


# -- what the stacks do ------------------------------------------------------------------------


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_stack(compose):
    services = compose["services"]
    api, trainer = services["api"], services["trainer"]
    assert gpu_devices(api) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu_devices(trainer) == gpu_devices(api)
    assert gpu_devices(services["train"])[0]["count"] == "all"  # torchrun may use every GPU
    assert [interpolate(p) for p in api["ports"]] == ["8000:8000"]
    assert api["depends_on"] == {"trainer": {"condition": "service_completed_successfully"}}
    assert api["environment"]["SATSEG_CHECKPOINT"] == CHECKPOINT
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert services["train"]["profiles"] == ["train"]
    assert services["tensorboard"]["profiles"] == ["tensorboard"]
    assert services["tensorboard"]["ports"] == ["6006:6006"]
    assert api["environment"]["SATSEG_DEVICE"] == "cuda"
    # SIGTERM's drain and the requests in flight get SATSEG_SHUTDOWN_GRACE_S (30 s) before SIGKILL.
    assert int(api["stop_grace_period"].removesuffix("s")) > 30
    # Checkpoints and data on named volumes; the API only reads them.
    assert set(compose["volumes"]) == {"data", "runs"}
    assert "runs:/runs" in trainer["volumes"] and "data:/data" in trainer["volumes"]
    assert api["volumes"] == ["runs:/runs:ro"]
    for name, service in services.items():
        assert service["image"] == "satseg:latest", name
        assert service["build"]["context"] == ".", name
        assert service["build"]["args"]["TORCH_VARIANT"] == "cuda", name
        assert interpolate(service["build"]["args"]["BASE_IMAGE"]) == "python:3.11-slim", name
        assert not service.get("privileged") and service.get("user") in (None, "satseg"), name


def test_cpu_stack_drops_every_gpu_reservation(compose_cpu):
    services = compose_cpu["services"]
    for name, service in services.items():
        assert gpu_devices(service) == [], name
        assert service["image"] == "satseg:cpu", name
        assert service["build"]["context"] == ".", name
        assert interpolate(service["build"]["args"]["TORCH_VARIANT"]) == "cpu", name
        assert service["build"]["args"]["TORCH_INDEX_URL"] == CPU_INDEX, name
    assert services["api"]["environment"]["SATSEG_DEVICE"] == "cpu"
    assert services["api"]["environment"]["SATSEG_CHECKPOINT"] == CHECKPOINT


# -- the commands exist and are documented -----------------------------------------------------


def python_m_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every ``python -m MODULE ARGS`` in ``text`` (shell line continuations joined)."""
    text = interpolate(text.replace("\\\n", " "))
    return [
        (m.group(1), shlex.split(m.group(2)))
        for m in re.finditer(r"python -m ([\w.]+)([^\n;]*)", text)
    ]


def service_commands(compose: dict[str, Any]) -> list[tuple[str, list[str]]]:
    commands = []
    for service in compose["services"].values():
        command = service.get("command", [])
        if isinstance(command, str):
            text = command
        elif command[:2] == ["sh", "-c"]:
            text = "\n".join(command[2:])
        else:
            text = shlex.join(command)
        commands.extend(python_m_commands(text))
    return commands


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (ln.strip().split(None, 1) for ln in joined.splitlines() if ln.strip())
    ]


def has_main(module: str) -> bool:
    """The module (or the package's ``__main__``) defines ``main`` and calls it when run."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not importable"
    if spec.submodule_search_locations:  # a package: python -m runs its __main__
        spec = importlib.util.find_spec(f"{module}.__main__")
        assert spec is not None and spec.origin is not None, f"{module} has no __main__"
    tree = ast.parse(Path(spec.origin).read_text())
    defines = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    guarded = "__name__" in ast.unparse(tree) and "__main__" in ast.unparse(tree)
    return defines and guarded


def test_every_python_m_command_exists_and_parses(compose):
    commands = service_commands(compose)
    modules = {module for module, _ in commands}
    assert modules == {"service", "trainer.prepare", "trainer.fit"}
    for module, argv in commands:
        assert has_main(module), module
        if module == "trainer.prepare":
            from trainer.prepare import build_parser

            args = build_parser().parse_args(argv)
            assert args.command == "bluemarble" and args.out == "/data/bluemarble"
        elif module == "trainer.fit":
            from trainer.config import load_config
            from trainer.fit import build_parser

            args = build_parser().parse_args(argv)
            assert (ROOT / args.config).is_file(), args.config
            cfg = load_config(ROOT / args.config, args.overrides)  # unknown keys raise
            assert cfg.data.root == "/data/bluemarble" and cfg.out_dir == "/runs"


def test_quick_run_writes_the_checkpoint_the_api_reads(compose):
    from trainer.config import load_config
    from trainer.dataset_layout import SPLIT_DIRS

    script = "\n".join(compose["services"]["trainer"]["command"][2:])
    [(_, argv)] = [c for c in python_m_commands(script) if c[0] == "trainer.fit"]
    cfg = load_config(ROOT / argv[1], argv[2:])
    assert f"{cfg.out_dir}/{cfg.run_name}/best.pt" == CHECKPOINT
    assert f"[ ! -f {CHECKPOINT} ]" in script  # trains only when that file is missing
    assert "[ ! -d /data/bluemarble/TEST_SET ]" in script and "TEST_SET" in SPLIT_DIRS["test"]
    assert script.startswith("set -e")  # a failed step fails the service, so the API waits


def test_console_scripts_used_by_the_stacks_are_installed(compose):
    names = {e.name for e in metadata.entry_points(group="console_scripts")}
    assert compose["services"]["tensorboard"]["command"][0] in names
    assert "torchrun" in names  # the multi-GPU command in the train profile's comment


def test_satseg_settings_in_compose_and_dockerfile_are_real_settings(compose, compose_cpu):
    from service.settings import Settings

    env: dict[str, str] = {}
    for kind, rest in dockerfile_instructions():
        if kind == "ENV":
            env.update(dict(re.findall(r"(SATSEG_\w+)=(\S+)", rest)))
    assert env["SATSEG_HOST"] == "0.0.0.0" and env["SATSEG_CHECKPOINT"] == CHECKPOINT
    for stack in (compose, compose_cpu):
        for service in stack["services"].values():
            env_of_service = {**env, **service.get("environment", {})}
            values = {
                k.removeprefix("SATSEG_").lower(): v
                for k, v in env_of_service.items()
                if k.startswith("SATSEG_")  # others (RAY_AUTH_MODE) belong to other programs
            }
            assert set(values) <= set(Settings.model_fields), sorted(values)
            Settings(_env_file=None, **values)  # values of the right type


def test_health_checks_probe_the_readiness_route():
    routes = (ROOT / "service" / "routes.py").read_text()
    assert '"/readyz"' in routes
    healthchecks = [rest for kind, rest in dockerfile_instructions() if kind == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/readyz" in healthchecks[0]


def test_commands_are_documented(compose):
    docs = "\n".join(p.read_text() for p in DOCS if p.exists())
    documented = set(re.findall(r"python -m ([\w.]*\w)", docs))
    modules = {m for m, _ in service_commands(compose)}
    cmd = dict(dockerfile_instructions())["CMD"]
    modules.add(" ".join(json.loads(cmd)).removeprefix("python -m "))
    assert modules <= documented, sorted(modules - documented)
    assert "docker compose up" in docs
    assert "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up" in docs
    assert "--profile train" in docs and "--profile tensorboard" in docs
    assert "torchrun" in docs


# -- the image --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage; the first list holds the ARGs before the first FROM."""
    stages: list[list[tuple[str, str]]] = [[]]
    for kind, rest in dockerfile_instructions():
        if kind == "FROM":
            stages.append([])
        stages[-1].append((kind, rest))
    return stages


def test_dockerfile_builds_on_the_base_image_argument_in_two_stages():
    preamble, build, image = dockerfile_stages()
    assert preamble == [("ARG", "BASE_IMAGE=python:3.11-slim")]
    assert build[0] == ("FROM", "${BASE_IMAGE} AS build")
    assert image[0] == ("FROM", "${BASE_IMAGE}")  # the same Python in both stages


def test_dockerfile_installs_dependencies_before_the_code_and_runs_unprivileged():
    _, build, image = dockerfile_stages()
    kinds = [kind for kind, _ in build]
    copies = [(i, rest) for i, (kind, rest) in enumerate(build) if kind in ("COPY", "ADD")]
    install = next(i for i, (kind, rest) in enumerate(build) if kind == "RUN" and "-e " in rest)
    assert [rest for _, rest in copies] == ["pyproject.toml ./", "wheelhouse/ /wheelhouse/"]
    assert all(i < install for i, _ in copies)  # no code yet: the dependency layer is cached
    assert "--no-index --find-links /wheelhouse/" in build[install][1]
    assert 'spec=".[$EXTRAS]"' in build[install][1]  # the extras (ray by default) offline too
    assert "ADD" not in kinds

    kinds = [kind for kind, _ in image]
    copies = [rest for kind, rest in image if kind == "COPY"]
    assert copies[0] == "--from=build /opt/venv /opt/venv"  # the environment, not the wheels
    assert {c.split()[0] for c in copies[1:]} >= {"shared/", "trainer/", "service/"}
    assert not any(c.split()[0] == "." for c in copies)  # the context holds the wheelhouse
    env = " ".join(rest for kind, rest in image if kind == "ENV")
    assert "ADD" not in kinds and "PATH=/opt/venv/bin:" in env

    users = [rest for kind, rest in image if kind == "USER"]
    assert users and users[-1] not in ("root", "0") and users[-1].split(":")[0] != "0"
    assert any(kind == "RUN" and "useradd" in rest and users[-1] in rest for kind, rest in image)
    assert kinds.index("USER") < kinds.index("CMD")
    assert json.loads(dict(image)["CMD"]) == ["python", "-m", "service"]
    assert "8000" in dict(image)["EXPOSE"]


def test_no_data_checkpoint_or_wheel_is_copied_into_the_image():
    _, _, image = dockerfile_stages()
    for kind, rest in dockerfile_instructions():
        if kind in ("COPY", "ADD"):
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert not re.search(r"(^|/)(data|runs)(/|$)|\.(pt|pth|ckpt)$", source), rest
        if kind == "VOLUME":
            pytest.fail("volumes belong in docker-compose.yml, not the image")
    for _kind, rest in image:
        assert "wheelhouse" not in rest, rest


def _dockerignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # no exceptions to reason about
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # .dockerignore syntax (Go filepath.Match plus **): * and ? stay within one path element.
    out = ""
    i = 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the build context) is left out of it: a pattern that
    matches the path or one of its parent folders excludes it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(_pattern_regex(p).match(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_data_checkpoints_and_caches_out_and_the_code_in():
    patterns = _dockerignore_patterns()
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "data/bluemarble/TEST_SET/IMAGES/r0300_c4200.jpg",
        "runs/quickstart/best.pt",
        "weights/resnet50.pth",
        "shared/__pycache__/labels.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/0.5/x",
        "satseg.egg-info/PKG-INFO",
        "model.pt",
    ]:
        assert dockerignored(path, patterns), path
    for path in [
        "pyproject.toml",
        "label_mapping.json",
        "shared/labels.py",
        "service/__main__.py",
        "service/static/index.html",
        "trainer/config.yaml",
        "trainer/configs/quickstart.yaml",
        "shared/data/readme.txt",  # only the top-level data/ is data
        "wheelhouse/README.md",  # keeps the folder the Dockerfile copies in existence
        "wheelhouse/cpu/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    ]:
        assert not dockerignored(path, patterns), path


def test_the_cpu_build_takes_torch_pins_from_pyproject(tmp_path):
    """The Dockerfile's CPU branch extracts torch/torchvision requirements from pyproject.toml;
    run that snippet on the real file."""
    run = next(
        rest
        for kind, rest in dockerfile_instructions()
        if "TORCH_INDEX_URL" in rest and kind == "RUN"
    )
    snippet = re.search(r'python3? -c "(.*?)" >', run).group(1)
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert [re.split(r"[<>=!~ ]", line)[0] for line in lines] == ["torch", "torchvision"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{line}"' in pyproject for line in lines)
