"""The command line: every listed subcommand works with --help; errors are clear."""
import subprocess
import sys

import pytest

from fastavts.cli import build_parser

SUBCOMMANDS = ["synth", "prepare", "merge", "train", "eval-sync", "offset", "probe-audio", "finetune",
               "export",
               "info"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastavts", *args], capture_output=True,
                          text=True, timeout=120)


def test_lists_exactly_the_working_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: fastavts " + cmd in r.stdout


def test_console_script_entry_point_imports():
    from importlib.metadata import entry_points
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "fastavts"]
    assert callable(ep.load())


def test_bad_override_is_refused_with_exit_2(tmp_path):
    r = run("synth", str(tmp_path / "x"), "synth.vidoes=3")
    assert r.returncode == 2
    assert "synth.vidoes" in r.stderr and "synth.videos" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_source_is_refused(tmp_path):
    r = run("prepare", str(tmp_path / "nope"), str(tmp_path / "out"), "prepare.codec=vp9")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_info_lists_settings_and_versions():
    r = run("info", "--config")
    assert r.returncode == 0 and "segment_seconds" in r.stdout
    r = run("info", "--json")
    assert r.returncode == 0 and '"torch"' in r.stdout
