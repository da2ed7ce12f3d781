"""The stage registry (stages.py) is the one list of stage names: what each consumer derives from it, and
no other module of src spelling out a list of stage names of its own."""

import ast

import pytest

from chatfactory import stages
from chatfactory.config import Config, load_config
from chatfactory.store.checkpoint import latest_stage
from conftest import ROOT


def test_the_lists_every_consumer_derives():
    assert stages.names() == ("pretrain", "sft", "comparisons", "reward", "rft", "ppo", "dpo", "grpo", "rloo")
    assert stages.policies() == ("pretrain", "sft", "rft", "ppo", "dpo", "grpo", "rloo")
    assert stages.policies(after=1) == ("rft", "ppo", "dpo", "grpo", "rloo")  # compared with SFT in the report
    assert stages.names(method="rl") == ("ppo", "grpo", "rloo")
    assert stages.names(lora=True) == ("sft", "reward", "rft", "ppo", "dpo", "grpo", "rloo")
    # chat, sample and generate take the furthest-along stage a run has
    assert stages.most_advanced_first() == ("ppo", "grpo", "rloo", "rft", "dpo", "sft", "pretrain")
    assert Config().pipeline.stages == "pretrain,sft,comparisons,reward,ppo,dpo"  # in_run, in pipeline order


def test_every_stage_has_a_config_section_and_an_entry_point_that_imports():
    cfg = load_config("tiny", [])
    for s in stages.STAGES:
        assert hasattr(cfg, s.name), f"no config section {s.name!r} for stage {s.name}"
        assert callable(stages.entry_point(s.name))
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stages.get("nope")


def test_latest_stage_follows_the_registry(tmp_path):
    for s in ("sft", "dpo", "pretrain"):
        (tmp_path / s).mkdir()
        (tmp_path / s / "model.safetensors").write_bytes(b"")
    assert latest_stage(tmp_path) == "dpo"
    (tmp_path / "rloo").mkdir()
    (tmp_path / "rloo" / "model.safetensors").write_bytes(b"")
    assert latest_stage(tmp_path) == "rloo"


def _stage_name_collections(path):
    """(line, names) of every tuple/list/set literal in a module holding two or more stage names."""
    known = set(stages.names())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            found = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in known]
            if len(found) >= 2:
                yield node.lineno, found


def test_no_other_module_lists_stage_names():
    listed = [f"{p.relative_to(ROOT)}:{line} {found}" for p in sorted((ROOT / "src" / "chatfactory").rglob("*.py"))
              if p.name != "stages.py" for line, found in _stage_name_collections(p)]
    assert not listed, "stage names listed outside stages.py (derive them from stages.STAGES):\n" + "\n".join(listed)
