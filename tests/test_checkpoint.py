"""Atomic checkpoints: round trip, clear errors on damage, recovery from a save cut short."""
import os

import pytest
import torch

from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import CONFIG, MODEL, STATE, load_checkpoint, save_checkpoint, unique_state_dict
from chatfactory.store.files import CheckpointError
from chatfactory.store.load import load_model


def _save(tmp_path, step=5, flavour="gpt2"):
    cfg = GPTConfig(flavour=flavour, depth=1, vocab_size=64, block_size=16)
    model = GPT(cfg)
    save_checkpoint(tmp_path, unique_state_dict(model), {"model": cfg.to_dict()}, {"optimizer": {}, "x": 1}, step)
    return model


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_round_trip_keeps_weights_and_ties(tmp_path, flavour):
    model = _save(tmp_path, flavour=flavour)
    loaded, info = load_model(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k  # bitwise, any host: stored bytes read back, no arithmetic
    if flavour == "gpt2":
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    _, _, state = load_checkpoint(tmp_path, with_state=True)
    assert state["step"] == 5 and state["x"] == 1


def test_truncated_weights_error_names_the_file(tmp_path):
    _save(tmp_path)
    p = tmp_path / MODEL
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(p)):
        load_checkpoint(tmp_path)


def test_corrupt_state_error_names_the_file(tmp_path):
    _save(tmp_path)
    p = tmp_path / STATE
    p.write_bytes(p.read_bytes()[: os.path.getsize(p) // 2])
    with pytest.raises(CheckpointError, match=str(p)):
        load_checkpoint(tmp_path, with_state=True)


def test_interrupted_save_rolls_forward_or_back(tmp_path):
    _save(tmp_path, step=5)
    # a complete set of temps from a save cut short between renames: finished on load
    save_checkpoint(tmp_path / "next", *_parts(step=9))
    for name in os.listdir(tmp_path / "next"):
        os.replace(tmp_path / "next" / name, tmp_path / (name + ".tmp"))
    os.replace(tmp_path / (MODEL + ".tmp"), tmp_path / MODEL)  # the first rename had happened
    _, _, state = load_checkpoint(tmp_path, with_state=True, repair=True)  # the writer resuming
    assert state["step"] == 9 and not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    # a torn temp (the process died while writing it): discarded, the old checkpoint stands
    (tmp_path / (STATE + ".tmp")).write_bytes(b"PK\x03\x04 torn")
    _, _, state = load_checkpoint(tmp_path, with_state=True, repair=True)
    assert state["step"] == 9 and not (tmp_path / (STATE + ".tmp")).exists()


def _parts(step):
    cfg = GPTConfig(flavour="gpt2", depth=1, vocab_size=64, block_size=16)
    return unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()}, {"optimizer": {}}, step


def test_a_reader_leaves_the_writers_temps_alone(tmp_path):
    """chat/serve/eval open a stage while its trainer checkpoints: the reader must not finish or discard
    the writer's temps (the writer may be renaming them); it reads the last complete checkpoint."""
    _save(tmp_path, step=5)
    save_checkpoint(tmp_path / "next", *_parts(step=9))
    for name in os.listdir(tmp_path / "next"):  # the writer's temps for step 9, not yet renamed
        os.replace(tmp_path / "next" / name, tmp_path / (name + ".tmp"))
    temps = sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp"))
    _, info, _ = load_checkpoint(tmp_path, repair=False)
    assert info["step"] == 5
    model, info = load_model(tmp_path)  # load_model is a reader
    assert info["step"] == 5 and sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp")) == temps
    # between the writer's renames: weights of step 9, config of step 5 -> the complete set of step 9 is read
    os.replace(tmp_path / (MODEL + ".tmp"), tmp_path / MODEL)
    _, info, _ = load_checkpoint(tmp_path, repair=False)
    assert info["step"] == 9 and (tmp_path / (CONFIG + ".tmp")).exists() and (tmp_path / (STATE + ".tmp")).exists()
    # the writer's temps of a first save, torn: nothing complete to read, a clear error; the temp stays
    first = tmp_path / "first"
    first.mkdir()
    (first / (MODEL + ".tmp")).write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*save in progress"):
        load_model(first)
    assert (first / (MODEL + ".tmp")).exists()


def test_the_reader_reads_what_safetensors_writes_and_names_a_damaged_file(tmp_path):
    """store/safetensors.py, the one reader every load goes through: each dtype a stage holds read back exactly
    (as the safetensors library reads it), rows of a table, and a header that does not describe its file (cut
    short, a byte too many, tensors overlapping, a length past the end) a CheckpointError naming the file,
    wherever the safetensors library refuses it too."""
    import json

    from safetensors.torch import load_file, save_file

    from chatfactory.store.safetensors import SafetensorsFile

    torch.manual_seed(0)
    tensors = {"f32": torch.randn(5, 4), "bf16": torch.randn(3, 2).bfloat16(), "f16": torch.randn(7).half(),
               "i8": torch.randint(-127, 127, (4, 4), dtype=torch.int8), "u8": torch.randint(0, 255, (6,)).byte(),
               "i64": torch.arange(3), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5)}
    path = tmp_path / MODEL
    save_file(tensors, str(path), metadata={"step": "3", "save_id": "3-ab"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"step": "3", "save_id": "3-ab"} and sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = f.read(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k  # bitwise, any host: bytes, no arithmetic
        assert torch.equal(f.read_rows("f32", 2, torch.empty(3, 4)), tensors["f32"][2:5])
        with pytest.raises(CheckpointError, match="rows 4..6 of f32"):
            f.read_rows("f32", 4, torch.empty(2, 4))
        with pytest.raises(CheckpointError, match=f"{path}: no tensor 'nope'"):
            f.read("nope")
        assert f.nbytes("f") == 5 * 4 * 4 + 7 * 2 and f.nbytes() == sum(t.nbytes for t in tensors.values())
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    header["i8"]["data_offsets"] = [header["i8"]["data_offsets"][0] - 4, header["i8"]["data_offsets"][1] - 4]
    overlap = json.dumps(header).encode()
    damaged = {"cut": raw[:-1], "longer": raw + b"\0", "empty": b"",
               "header-past-the-end": (10**6).to_bytes(8, "little") + raw[8:],
               "overlap": len(overlap).to_bytes(8, "little") + overlap + raw[8 + n:]}
    for name, data in damaged.items():
        bad = tmp_path / name / MODEL
        bad.parent.mkdir()
        bad.write_bytes(data)
        with pytest.raises(Exception):  # noqa: B017 (the library's own error types differ by case)
            load_file(str(bad))
        with pytest.raises(CheckpointError, match=f"{bad}: corrupt or truncated checkpoint"):
            SafetensorsFile(bad)
