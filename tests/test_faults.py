"""Faults in training, fast (issue 14; bench/faults.py measures the real thing with SIGKILL and a tmpfs):
a full disk during a save gives a clear error naming the file and leaves the previous checkpoint
loadable; a save killed at any point (the first one too; a re-save of the same step too) resumes; damaged
files are named."""
import errno
import json
import os

import pytest
import torch
from safetensors import SafetensorError

from chatfactory.config import TrainConfig
from chatfactory.store import checkpoint as ck
from chatfactory.store.checkpoint import CONFIG, MODEL, STATE, load_checkpoint, save_checkpoint
from chatfactory.store.files import CheckpointError, DiskFullError, atomic_write_text
from chatfactory.train import loop, meters
from chatfactory.train.loop import Stage, train

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}


def _state(seed):
    return {"optimizer": {"m": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}}


def _no_temps(d):
    return not [n for n in os.listdir(d) if n.endswith(".tmp")]


def _half_then_enospc(real):
    """A writer that writes the start of the file, then finds the disk full (what a small tmpfs does)."""
    def write(obj, target, *a, **k):
        real(obj, target, *a, **k)
        path = target if isinstance(target, (str, os.PathLike)) else None
        if path is None:  # a file object: write part of it
            target.write(b"PK\x03\x04 partial")
        else:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        raise ENOSPC
    return write


@pytest.mark.parametrize("failing", [MODEL, CONFIG, STATE])
def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    save_checkpoint(tmp_path, _weights(1), {"model": {}}, _state(1), step=5)
    before = {n: (tmp_path / n).read_bytes() for n in (MODEL, CONFIG, STATE)}
    if failing == MODEL:
        def full(tensors, filename, metadata=None):  # safetensors wraps the OSError in its own error
            open(filename, "wb").write(b"\x00" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(ck, "save_file", full)
    elif failing == CONFIG:
        real = type(tmp_path).write_text

        def full(self, *a, **k):
            if self.name.startswith(CONFIG):
                real(self, "{\"model\"")
                raise ENOSPC
            return real(self, *a, **k)
        monkeypatch.setattr(type(tmp_path), "write_text", full)
    else:
        monkeypatch.setattr(ck.torch, "save", _half_then_enospc(torch.save))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, _weights(2), {"model": {}}, _state(2), step=9)
    msg = str(e.value)
    assert isinstance(e.value, DiskFullError) and "disk full" in msg and str(tmp_path / failing) in msg, msg
    assert "previous checkpoint (step 5)" in msg, msg
    assert _no_temps(tmp_path), os.listdir(tmp_path)  # the partial temp is gone: it would hold the space
    assert {n: (tmp_path / n).read_bytes() for n in (MODEL, CONFIG, STATE)} == before
    monkeypatch.undo()
    weights, info, state = load_checkpoint(tmp_path, with_state=True)
    assert info["step"] == state["step"] == 5 and torch.equal(weights["w"], _weights(1)["w"])  # stored bytes


def test_a_full_disk_while_logging_metrics_names_the_file(tmp_path, monkeypatch):
    m = meters.Metrics(tmp_path / "metrics.jsonl", True)
    m.log({"step": 1})

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, text):
            raise ENOSPC
    monkeypatch.setattr("builtins.open", Full)
    with pytest.raises(DiskFullError, match=r"metrics\.jsonl: disk full"):
        m.log({"step": 2})


def test_atomic_write_text_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "pipeline.json"
    atomic_write_text(p, "old")
    real = type(p).write_text

    def full(self, *a, **k):
        real(self, "ne")
        raise ENOSPC
    monkeypatch.setattr(type(p), "write_text", full)
    with pytest.raises(DiskFullError, match="pipeline.json: disk full"):
        atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old" and _no_temps(tmp_path)


def test_a_resave_of_the_same_step_killed_after_the_weights_temp_is_discarded(tmp_path):
    """The reward model saves its last step twice (trained, then calibrated). A kill right after the second
    save wrote its weights' temp left that temp beside the first save's config and state, all of one step:
    resuming took the set as complete and renamed the calibrated weights in under the uncalibrated mark,
    and the calibration then ran again on them (shifted twice). Files agree only within one save now."""
    save_checkpoint(tmp_path, _weights(1), {"model": {}, "finished": False}, _state(1), step=8)
    other = tmp_path / "other"
    save_checkpoint(other, _weights(2), {"model": {}, "finished": True}, _state(1), step=8)
    os.replace(other / MODEL, tmp_path / (MODEL + ".tmp"))  # killed before the config's temp was written
    weights, info, _ = load_checkpoint(tmp_path, with_state=True, repair=True)  # the writer resuming
    assert torch.equal(weights["w"], _weights(1)["w"]) and info["finished"] is False and _no_temps(tmp_path)


def test_a_reader_never_pairs_files_of_two_saves_of_one_step(tmp_path):
    save_checkpoint(tmp_path, _weights(1), {"model": {}, "finished": False}, _state(1), step=8)
    other = tmp_path / "other"
    save_checkpoint(other, _weights(2), {"model": {}, "finished": True}, _state(1), step=8)
    for n in (MODEL, CONFIG, STATE):
        os.replace(other / n, tmp_path / (n + ".tmp"))
    os.replace(tmp_path / (MODEL + ".tmp"), tmp_path / MODEL)  # between the writer's renames
    weights, info, _ = load_checkpoint(tmp_path)  # the complete second save, not its weights + the first's mark
    assert torch.equal(weights["w"], _weights(2)["w"]) and info["finished"] is True


# ---------------------------------------------------------------- through the training loop
class Toy(Stage):
    name = "toy"
    model_config = {"toy": True}

    def micro_batch(self, step, micro, rank, world):
        g = torch.Generator().manual_seed(step)
        return torch.randn(8, 16, generator=g)

    def loss(self, model, batch):
        return (model(batch) - batch.flip(1)).pow(2).mean() + 0.0 * torch.rand(()).item()

    def token_count(self, batch):
        return batch.shape[0]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 16))


def _cfg(steps=6):
    return TrainConfig(steps=steps, ckpt_every=2, eval_every=0, warmup_steps=1, progress=False, device="cpu")


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch):
    monkeypatch.setattr(loop, "peak_flops", lambda device, dtype: 1.0)


def test_a_full_disk_stops_training_with_the_error_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    whole = _model()
    train(Toy(), whole, _cfg(), tmp_path / "whole")
    saves = []
    real = ck._save_torch

    def fills_up(obj, tmp):
        saves.append(obj["step"])
        if len(saves) == 2:  # the second checkpoint (step 4) does not fit
            with open(tmp, "wb") as f:
                f.write(b"PK partial")
            raise ENOSPC
        real(obj, tmp)
    monkeypatch.setattr(ck, "_save_torch", fills_up)
    d = tmp_path / "full"
    with pytest.raises(DiskFullError, match=r"state\.pt: disk full.*previous checkpoint \(step 2\)"):
        train(Toy(), _model(), _cfg(), d)
    assert _no_temps(d) and load_checkpoint(d, with_state=True)[2]["step"] == 2
    monkeypatch.undo()
    resumed = _model()
    train(Toy(), resumed, _cfg(), d)  # space freed: the same command resumes from step 2
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # bitwise, same host: a resume runs the whole run's operations


def test_a_kill_during_the_first_save_starts_over(tmp_path):
    """Only a torn temp of the first save on disk: the resume used to fail ('model.safetensors: checkpoint
    file is missing'); it discards the temp and trains from step 0."""
    d = tmp_path / "run" / "toy"
    d.mkdir(parents=True)
    (d / (MODEL + ".tmp")).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    model = _model()
    train(Toy(), model, _cfg(steps=2), d)
    whole = _model()
    train(Toy(), whole, _cfg(steps=2), tmp_path / "whole")
    assert _no_temps(d) and all(torch.equal(a, b)  # bitwise, same host: the same run from step 0
                                for a, b in zip(model.state_dict().values(), whole.state_dict().values()))


# ---------------------------------------------------------------- damaged files are named
def test_a_garbage_tokenizer_config_is_named(tmp_path):
    from chatfactory.text.tokenizer import Tokenizer

    Tokenizer.train(["hello world " * 50], vocab_size=300).save(tmp_path / "tokenizer.json")
    for bad in (os.urandom(64) + b"\xff\xfe", b"[1, 2]"):
        (tmp_path / "tokenizer_config.json").write_bytes(bad)
        with pytest.raises(ValueError, match="tokenizer_config.json"):
            Tokenizer.load(tmp_path / "tokenizer.json")


def test_a_config_json_that_is_not_an_object_is_named(tmp_path):
    save_checkpoint(tmp_path, _weights(1), {"model": {}}, None, step=1)
    (tmp_path / CONFIG).write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=str(tmp_path / CONFIG)):
        load_checkpoint(tmp_path)


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # then the kill (torn row)
    train(Toy(), _model(), _cfg(steps=2), d)
    assert [r["step"] for r in meters.read_metrics(d / "metrics.jsonl")] == [1, 2]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    assert meters.read_metrics(tmp_path / "m.jsonl") == [{"step": 1}]
