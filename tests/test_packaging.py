"""What gets installed is what was tested: every package ships, and the locked versions run."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.quick


def test_every_python_package_of_the_project_is_installed_by_pip_install():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(ROOT, include=["worker*", "tasks*", "migrations*"])

    assert sorted(found) == sorted(declared["packages"]), "a package the image would not hold"


def test_the_environment_runs_the_locked_versions():
    locked = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    )
    differing = {
        name: (locked[name], version(name))
        for name in (
            "celery",
            "kombu",
            "billiard",
            "redis",
            "sqlalchemy",
            "flower",
            "psycopg2-binary",
        )
        if version(name) != locked[name]
    }

    assert differing == {}, f"installed versions are not requirements.lock's: {differing}"
