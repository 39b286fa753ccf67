"""The repository root, found one way: the checkout that `vitune submit` uploads as a job's working dir and that
`python -m vitune.cli.manifests` reads `serving/config.yaml` from.

Only commands that act on a checkout need it: the library and `vitune demo` run from the installed package
(presets and the Serve application ship in it), from any directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import vitune

# what makes a folder the repository: the job entrypoints a cluster runs, beside the project file
MARKERS = ("jobs/", "pyproject.toml")


class RepositoryNotFound(FileNotFoundError):
    """No vitune checkout where one was looked for; the message says where and what to do."""


def is_repo_root(folder: Path) -> bool:
    return (folder / "jobs").is_dir() and (folder / "pyproject.toml").is_file()


def installed_checkout() -> Path | None:
    """The checkout the package is installed from (an editable install: <root>/platform/vitune), if any."""
    root = Path(vitune.__file__).resolve().parents[2]
    return root if is_repo_root(root) else None


def find_repo_root(start: str | Path | None = None) -> Path:
    """The first folder at or above ``start`` (default: the cwd) that holds ``jobs/`` and ``pyproject.toml``;
    else the checkout of an editable install."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if is_repo_root(folder):
            return folder
    checkout = installed_checkout()
    if checkout is not None:
        return checkout
    raise RepositoryNotFound(f"no vitune repository (a folder with {' and '.join(MARKERS)}) at or above {here}, "
                             "and vitune is not installed from a checkout: run from the repository or name it")
