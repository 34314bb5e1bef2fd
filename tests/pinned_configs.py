"""The resolved settings of every shipped config and preset, pinned (pinned_configs.json).

A shipped config states in its second line what it sits on: the defaults, or a demo preset
(fastavts/demo.py). Its settings are that layer with the file on top; a change of a default,
a preset or the file changes them, and tests/test_config.py then fails until the recipe is
measured again, its figures updated, and the pins rewritten:

    python tests/pinned_configs.py        # rewrites tests/pinned_configs.json
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = Path(__file__).with_name("pinned_configs.json")
BASES = {"the defaults": None, "the CPU demo preset": "cpu", "the GPU demo preset": "gpu"}


def base_of(path: Path) -> str:
    """What a shipped config says it sits on (its 'Sits on:' line)."""
    m = re.search(r"^# Sits on: (the defaults|the CPU demo preset|the GPU demo preset)",
                  path.read_text(), re.M)
    if not m:
        raise AssertionError(f"{path.name}: no '# Sits on: the defaults | the CPU demo preset | "
                             f"the GPU demo preset' line")
    return m.group(1)


def preset(base: str) -> list[str]:
    from fastavts.demo import CPU_PRESET, GPU_PRESET
    kind = BASES[base]
    return [] if kind is None else (CPU_PRESET if kind == "cpu" else GPU_PRESET)


def resolved() -> dict:
    """{name: {"on": base, "settings": the built config as a dict}}."""
    from fastavts.config import build_config

    out = {}
    for base in ("the CPU demo preset", "the GPU demo preset"):
        out[f"preset: {base}"] = dict(on="the defaults", settings=dataclasses.asdict(
            build_config(None, (), base=preset(base))))
    for path in sorted((REPO / "configs").glob("*.yaml")):
        base = base_of(path)
        out[f"configs/{path.name}"] = dict(on=base, settings=dataclasses.asdict(
            build_config(path, (), base=preset(base))))
    return out


if __name__ == "__main__":
    PINS.write_text(json.dumps(resolved(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINS}")
