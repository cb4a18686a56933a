"""The README's promises that code can check: every setting documented, the commands it gives real."""

from __future__ import annotations

import re

from settings import REPO_ROOT, Settings, env_name
from tests.docs import code_lines, section


def test_every_setting_is_in_the_configuration_table() -> None:
    _, text = section("Configuration")
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    missing = [env_name(name) for name in Settings.model_fields if env_name(name) not in rows]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_documented_default_is_the_real_one() -> None:
    _, text = section("Configuration")
    for name, field in Settings.model_fields.items():
        if name == "model_id":
            continue
        row = next(line for line in text.splitlines() if line.startswith(f"| `{env_name(name)}` |"))
        assert row.split("|")[2].strip() == f"`{field.default}`", f"README documents another default: {row}"


def test_quick_start_is_one_install_and_one_run_command() -> None:
    _, text = section("Quick start")
    lines = code_lines(text)
    assert lines[:2] == ["pip install -r requirements.txt", "serve run ray_serve_app:deployment_graph"]
    assert "python -m pytest" in lines


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "python -m pytest"


def _anchors(markdown: str) -> set[str]:
    """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", markdown, re.M)
    }


def test_every_relative_link_in_the_docs_resolves() -> None:
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "benchmarks" / "results").glob("*.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path) if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken
