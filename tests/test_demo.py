"""The demo's data step: made once, reused, and made again (not mixed) when its settings change."""
from __future__ import annotations

import json

from fastavts.config import build_config
from fastavts.demo import CPU_PRESET, prepare_demo_data

SMALL = ["train.demo_videos=4", "train.demo_heldout=4", "synth.min_duration=2.0",
         "synth.max_duration=2.5", "synth.workers=1"]


def widths(folder):
    return {json.loads(p.read_text())["width"] for p in folder.glob("synth_*.json")}


def test_demo_data_is_reused_and_remade_when_its_settings_change(tmp_path, capsys):
    root = tmp_path / "demo"
    cfg = prepare_demo_data(build_config(overrides=SMALL, base=CPU_PRESET), root, progress=False)
    assert (root / ".ready").is_file()
    assert cfg.train.data == str(root / "train") and cfg.train.eval_data == str(root / "heldout")
    first = widths(root / "synth_train")
    manifest = (root / "train" / "manifest.jsonl").read_text()
    assert len(manifest.splitlines()) == 4 and len(widths(root / "synth_heldout")) == 1

    # the same settings: nothing is made again
    prepare_demo_data(build_config(overrides=SMALL, base=CPU_PRESET), root, progress=False)
    assert "made with other settings" not in capsys.readouterr().out
    assert (root / "train" / "manifest.jsonl").read_text() == manifest

    # other frame sizes: every video is made again at the new size, none is kept
    other = SMALL + ["synth.width=64", "synth.height=64"]
    prepare_demo_data(build_config(overrides=other, base=CPU_PRESET), root, progress=False)
    assert "made with other settings" in capsys.readouterr().out
    assert widths(root / "synth_train") == widths(root / "synth_heldout") == {64} != first
    assert len((root / "train" / "manifest.jsonl").read_text().splitlines()) == 4
