"""Mesh presets for common slices: `--config.mesh.preset=v5e-16` sets mesh.data/fsdp/tensor
and mesh.strategy; any of those four given explicitly on the command line still wins.

Plain data, one line of reasoning each. The split follows one rule of thumb: FSDP first
(parameters and optimizer state sharded over every chip, ZeRO-3), because up to ~7B the
per-layer all-gathers hide behind the matmuls on ICI/NVLink and it frees the most memory;
a `data` axis appears only on big slices, to keep those all-gathers inside groups of 16
chips; tensor parallelism only when one layer's activations no longer fit (not needed for
the presets here, 7B included). `devices` counts JAX devices (v4 and v5p megacores: one
device per chip), `hosts` the VMs of the slice (= JAX processes), `hbm_gib` the memory of
one device, used by `flaxlm compile` to say whether a run fits.
"""

from __future__ import annotations

import dataclasses

import ml_collections

MESH_KEYS = ("data", "fsdp", "tensor", "strategy")


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    devices: int
    hosts: int
    hbm_gib: float
    data: int
    fsdp: int
    tensor: int
    strategy: str
    why: str


MESH_PRESETS: dict[str, MeshPreset] = {
    "v4-8": MeshPreset(4, 1, 32, 1, 4, 1, "fsdp",
                       "4 megacore chips on one host; FSDP over all 4 fits 1B with room for "
                       "activations"),
    "v5e-8": MeshPreset(8, 1, 16, 1, 8, 1, "fsdp",
                        "16 GiB per chip is tight: shard params and optimizer over all 8"),
    "v5e-16": MeshPreset(16, 4, 16, 1, 16, 1, "fsdp",
                         "4 hosts on one ICI torus: FSDP across all 16 still rides ICI, "
                         "never the data-centre network"),
    "v5e-256": MeshPreset(256, 64, 16, 16, 16, 1, "fsdp",
                          "full pod: FSDP in groups of 16 keeps all-gathers short; 16-way "
                          "data parallel on top needs a global batch >= 256"),
    "v5p-8": MeshPreset(4, 1, 95, 1, 4, 1, "fsdp",
                        "4 megacore chips with 95 GiB each: FSDP over 4, memory to spare "
                        "up to 7B"),
    "v5p-128": MeshPreset(64, 16, 95, 4, 16, 1, "fsdp",
                          "64 chips on a 3D torus: FSDP over 16, 4 data-parallel groups so "
                          "gradient reductions run on separate links"),
    "v6e-8": MeshPreset(8, 1, 32, 1, 8, 1, "fsdp",
                        "8 chips on one host: FSDP over all 8, as on v5e-8 with twice the "
                        "memory"),
    "v6e-256": MeshPreset(256, 64, 32, 16, 16, 1, "fsdp",
                          "full pod: FSDP in groups of 16, 16-way data parallel, as on "
                          "v5e-256"),
    "8xH100": MeshPreset(8, 1, 80, 1, 8, 1, "fsdp",
                         "one NVLink host: FSDP over 8 GPUs; tensor parallelism pays only "
                         "beyond ~13B or across nodes"),
}  # fmt: skip


def get_mesh_preset(name: str) -> MeshPreset:
    if name not in MESH_PRESETS:
        raise ValueError(f"mesh.preset={name!r}: unknown; choose from {sorted(MESH_PRESETS)}")
    return MESH_PRESETS[name]


def explicit_mesh_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The mesh.* keys set on the command line (["mesh.fsdp=4", ...] -> {"fsdp"})."""
    keys = set()
    for item in overrides:
        key = item.partition("=")[0]
        if key.startswith("mesh.") and key[len("mesh.") :] in MESH_KEYS:
            keys.add(key[len("mesh.") :])
    return keys


def apply_mesh_preset(
    config: ml_collections.ConfigDict, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """Fill mesh.data/fsdp/tensor/strategy from `mesh.preset` (if set), keeping the ones
    given in `overrides`. Returns a copy; raises ValueError naming an unknown preset."""
    name = config.mesh.get("preset", "")
    if not name:
        return config
    preset = get_mesh_preset(name)
    config = ml_collections.ConfigDict(config.to_dict())
    keep = explicit_mesh_keys(overrides)
    for key in MESH_KEYS:
        if key not in keep:
            config.mesh[key] = getattr(preset, key)
    return config


def preset_table() -> str:
    """The presets as a Markdown table (README, `flaxlm compile --list-meshes`)."""
    lines = [
        "| preset | devices | hosts | HBM/device | data × fsdp × tensor | why |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in MESH_PRESETS.items():
        lines.append(
            f"| {name} | {p.devices} | {p.hosts} | {p.hbm_gib:g} GiB | "
            f"{p.data} × {p.fsdp} × {p.tensor} ({p.strategy}) | {p.why} |"
        )
    return "\n".join(lines)
