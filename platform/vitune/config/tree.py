"""The raw tree a job config is validated from: a preset's mapping + stage block + overrides + references.

``resolve_tree`` is the one order of operations (``vitune.config.build_config`` validates its result):

1. ``key.sub=value`` overrides are parsed (values as YAML scalars: ``1`` is an int, ``[a, b]`` a list);
2. the block under ``stages.<stage>`` is deep-merged over the rest (the stage may itself be an override, and a
   ``stages.<stage>.…`` override changes that block before the merge);
3. the overrides are applied;
4. a relative local ``storage.root`` is pinned to this process's cwd (Ray workers run elsewhere);
5. ``${a.b}`` references are replaced by the value at ``a.b`` of the same tree.

``validation_message`` words a failed validation so that each line names the field and the value.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from pydantic import ValidationError

from vitune import storage


class ConfigError(ValueError):
    """A configuration that cannot be loaded; the message names the field and the value."""


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any]]:
    """``["train.lr=0.1"]`` → ``[(["train", "lr"], 0.1)]``; a leading ``--`` on a key is ignored."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        out.append((key.split("."), _parse_value(value)))
    return out


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = nxt
    node[path[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else in ``top`` replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def interpolate(tree: Any, root: dict | None = None, _depth: int = 0) -> Any:
    """Replace ``${a.b}`` in strings with the value at ``a.b`` of the same config (after overrides)."""
    root = tree if root is None else root
    if _depth > 10:
        raise ConfigError("config references (${...}) nest too deep or form a cycle")
    if isinstance(tree, dict):
        return {k: interpolate(v, root, _depth) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolate(v, root, _depth) for v in tree]
    if not isinstance(tree, str) or "${" not in tree:
        return tree

    def lookup(match: re.Match) -> str:
        node: Any = root
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config reference ${{{match.group(1)}}} names no value")
            node = node[part]
        return str(interpolate(node, root, _depth + 1))

    return _REF.sub(lookup, tree)


def resolve_tree(raw: dict, overrides: list[str] | tuple[str, ...] = (), default_stage: str | None = None) -> dict:
    """The tree to validate: see the module docstring. ``default_stage`` is None for jobs without stages."""
    raw = copy.deepcopy(raw or {})
    parsed = parse_overrides(overrides)
    # the stage may itself be an override, and an override into a stage's block (stages.finetune.train.lr=...)
    # must land in that block before it is merged: both go first
    for path, value in parsed:
        if path == ["stage"] or path[0] == "stages":
            _set_path(raw, path, value)
    stages = raw.pop("stages", None) or {}
    if default_stage is not None and stages:
        stage = raw.get("stage", default_stage)
        if stage not in stages:
            raise ConfigError(f"stage: {stage!r} has no block under 'stages' (have: {sorted(stages)})")
        raw = deep_merge(raw, stages[stage])
    for path, value in parsed:
        if path[0] != "stages":
            _set_path(raw, path, value)
    # a relative storage root means the driver's cwd: pin it before anything derives paths from it
    root = raw["storage"].get("root") if isinstance(raw.get("storage"), dict) else None
    if isinstance(root, str) and "${" not in root:
        raw["storage"]["root"] = storage.absolute(root)
    return interpolate(raw)


def validation_message(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field (value {e.get('input')!r})")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)
