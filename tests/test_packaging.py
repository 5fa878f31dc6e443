"""The built wheel carries every resource file of the package.

An editable install reads files from the source tree, so a resource missing from
``[tool.setuptools.package-data]`` only shows up in a real install (Docker, pip install .).
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_package_resource(tmp_path):
    # Build from a clean copy: a stale build/ directory in the checkout would mask omissions.
    src = tmp_path / "src"
    shutil.copytree(
        REPO, src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "demo", "work",
                                      "__pycache__", ".pytest_cache", "tests"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("bids_qmri-*.whl"))
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    resources = sorted(
        p.relative_to(REPO).as_posix()
        for p in (REPO / "bids_qmri").rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    )
    assert resources, "the package should have resource files (templates, models, data)"
    missing = [r for r in resources if r not in in_wheel]
    assert not missing, f"package-data misses: {missing}"
