"""YAML files that ship inside the package (presets, hierarchies, label maps) or that a user gives
as a path: one lookup for both, so ``--config vitl14`` and ``--config my.yaml`` (or ``wbc-h1`` and
``tree.yaml``) behave alike everywhere."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


class NotPackaged(LookupError):
    """A name that is neither a YAML file nor a YAML file packaged in ``package``."""


def names(package: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names (without ``.yaml``) of the YAML files packaged in ``package``, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(package).iterdir()
                  if p.name.endswith(".yaml") and p.name[: -len(".yaml")] not in exclude)


def read_text(name_or_path: str | Path, package: str) -> tuple[str, str | None]:
    """``(text, path)`` of a YAML path (``.yaml``/``.yml`` or an existing file), or ``(text, None)`` of
    ``<package>/<name>.yaml``. Raises ``FileNotFoundError`` for a missing path and ``NotPackaged``
    for an unknown name. A directory named like a packaged file (a run directory) is not a path here."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{name_or_path} does not exist")
        return path.read_text(), str(path)
    res = resources.files(package) / f"{name_or_path}.yaml"
    if not res.is_file():
        raise NotPackaged(str(name_or_path))
    return res.read_text(), None
