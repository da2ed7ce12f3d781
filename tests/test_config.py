"""Typed config: presets, overrides, and errors that name the bad key."""
import pytest

from chatfactory.config import load_config


def test_preset_and_overrides_are_typed():
    cfg = load_config("tiny", ["pretrain.steps=7", "pretrain.lr=1e-3", "model.depth=3", "pretrain.compile=false"])
    assert cfg.pretrain.steps == 7 and cfg.pretrain.lr == 1e-3 and cfg.pretrain.compile is False
    assert cfg.model.depth == 3 and cfg.model.n_embd == 3 * cfg.model.aspect


def test_unknown_override_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key 'pretrain\.stepz'"):
        load_config("tiny", ["pretrain.stepz=5"])
    with pytest.raises(ValueError, match=r"unknown config section 'pretrian'"):
        load_config("tiny", ["pretrian.steps=5"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  depth: 2\n  widht: 64\n")
    with pytest.raises(ValueError, match=r"mine\.yaml.*'model\.widht'"):
        load_config(str(f))


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"pretrain\.steps.*'ten'"):
        load_config("tiny", ["pretrain.steps=ten"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("tiny", ["steps=10"])
    f = tmp_path / "t.yaml"
    f.write_text("pretrain:\n  steps: [1, 2]\n")
    with pytest.raises(ValueError, match=r"pretrain\.steps must be int"):
        load_config(str(f))
    with pytest.raises(FileNotFoundError, match="no config file or preset"):
        load_config("no-such-preset")


def test_every_preset_loads():
    from chatfactory.config import CONFIG_DIR

    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "demo", "shakespeare", "gpt2-124m"} <= set(presets)
    for name in presets:
        load_config(name)


@pytest.mark.slow
def test_presets_ship_inside_a_non_editable_install(tmp_path):
    """`pip install .` (not -e): the presets come with the package, so `--config tiny` works anywhere."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    src = tmp_path / "src"  # a copy of what the sdist holds: nothing is built inside the repo itself
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import chatfactory.config as c; cfg = c.load_config('tiny'); "
            "print(c.__file__); print(sorted(p.stem for p in c.CONFIG_DIR.glob('*.yaml')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr[-3000:]
    where, presets = r.stdout.splitlines()[:2]
    assert where.startswith(str(target)), where  # the installed copy, not the repo's
    assert {"tiny", "demo"} <= set(eval(presets))
