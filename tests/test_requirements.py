"""Every dependency is pinned to a tested range: the original broke when an unpinned Gradio moved on (gr.inputs)."""

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

