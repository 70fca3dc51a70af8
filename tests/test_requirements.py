"""Every dependency is pinned to a tested range: the original broke when an unpinned Gradio moved on (gr.inputs)."""

import re
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement

from tiny import REPO


def requirements(name: str) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in (REPO / name).read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_dependency_has_a_tested_range(name):
    for req in requirements(name):
        operators = {spec.operator for spec in req.specifier}
        assert "==" in operators or ({">=", "<"} <= operators), f"{name}: {req} needs a lower and an upper bound"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_installed_versions_are_inside_the_ranges(name):
    """What the tests run on is what the files promise (so the ranges are the tested ones)."""
    for req in requirements(name):
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} from {name} is not installed: pip install -r {name}")
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is outside {req.specifier}"



def cmake_args(text: str) -> list[str]:
    """The llama.cpp build flags a shell text sets (continued lines joined)."""
    found = re.search(r'CMAKE_ARGS="([^"]*)"', text.replace("\\\n", " "))
    assert found, "no CMAKE_ARGS"
    return found[1].split()


def test_the_readme_test_command_builds_llama_cpp_as_ci_does():
    """Without .ci/run's CMAKE_ARGS, pip's default llama.cpp build takes twice as long and crashes on AMX Xeons."""
    readme = (REPO / "README.md").read_text().split("One command runs the test suite", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", readme, re.S)[1]
    assert re.match(r'CMAKE_ARGS="[^"]*" pip install -r requirements-dev.txt && ', command), command
    assert command.endswith("&& python -m pytest -q"), command
    ci = (REPO / ".ci" / "run").read_text()
    assert cmake_args(command) == cmake_args(ci)
    assert "-DGGML_NATIVE=OFF" in cmake_args(ci)
