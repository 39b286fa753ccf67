"""Projector registry: maps vision features `[.., Dv]` into the LM embedding space `[.., Dl]`.

Names:
- `linear`        — one Linear, as in the LLaVA paper.
- `mlp<N>x_gelu`  — N Linear layers with GELU between them (`mlp2x_gelu` is LLaVA v1.5's:
                    Linear(Dv, Dl), GELU, Linear(Dl, Dl)).
- `identity`      — no parameters; requires Dv == Dl.

Layouts match LLaVA's `mm_projector` state dicts (`weight`/`bias` for linear; `0.*`, `2.*`, ... for
the MLP), so its released projector weights load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_FIXED = ("linear", "identity")
_MLP_PREFIX = "mlp"
_MLP_SUFFIX = "x_gelu"
VALID_NAMES = "linear, identity, mlp<N>x_gelu with N >= 1 (e.g. mlp2x_gelu)"


@dataclass(frozen=True)
class ProjectorSpec:
    """A parsed projector name: its kind and, for MLPs, the number of Linear layers."""

    kind: str  # "linear" | "identity" | "mlp_gelu"
    depth: int = 1


def parse_projector_name(name: str) -> ProjectorSpec:
    """Parse a projector name into a `ProjectorSpec`; raise `ValueError` listing valid names."""
    if name in _FIXED:
        return ProjectorSpec(kind=name)
    if name.startswith(_MLP_PREFIX) and name.endswith(_MLP_SUFFIX):
        depth_text = name[len(_MLP_PREFIX) : -len(_MLP_SUFFIX)]
        if depth_text.isdigit() and int(depth_text) >= 1:
            return ProjectorSpec(kind="mlp_gelu", depth=int(depth_text))
    raise ValueError(f"unknown projector {name!r}; valid: {VALID_NAMES}")


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the projector `name` from vision width `in_dim` to LM width `out_dim`."""
    spec = parse_projector_name(name)
    if spec.kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"projector 'identity' needs equal widths, got vision {in_dim} and LM {out_dim}")
        return nn.Identity()
    if spec.kind == "linear":
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(spec.depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
