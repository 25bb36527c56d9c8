"""The lock (constraints.txt) is the set the suite passed with; pyproject.toml and requirements.txt agree with it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin name==version"
            found[canonicalize_name(name)] = version
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_bounds(requirement):
    locked = pins().get(canonicalize_name(requirement.name))
    assert locked is not None, f"{requirement.name} is declared in pyproject.toml but not pinned in constraints.txt"
    assert requirement.specifier.contains(locked, prereleases=True), (
        f"constraints.txt pins {requirement.name}=={locked}, outside pyproject.toml's {requirement.specifier}")


def test_every_declared_dependency_has_a_floor_and_a_ceiling():
    for requirement in declared():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators & {">=", "=="} and (operators & {"<", "=="} or requirement.name == "packaging"), (
            f"pyproject.toml: {requirement} needs a lower and an upper bound")


def test_requirements_txt_installs_pyprojects_dependencies_through_the_lock():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "-c constraints.txt" in lines
    names = {canonicalize_name(line) for line in lines if not line.startswith("-")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert names == {canonicalize_name(Requirement(text).name) for text in project["dependencies"]}


def test_the_space_runs_the_locked_gradio_the_readme_names():
    import yaml

    front = yaml.safe_load((ROOT / "README.md").read_text().split("---")[1])
    gradio_pin = next(r for r in declared() if r.name == "gradio")
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert str(gradio_pin.specifier) == f"=={front['sdk_version']}" == f"=={pins()['gradio']}"


def test_ci_and_the_readme_install_from_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line)
    assert "-c constraints.txt" in test_command and "pip check" in test_command
    assert test_command.strip() in readme, "README's test command must be the one .ci/run runs"
