"""Models by Hub id (formats/hub.py): ``chatfactory import --from hf:ORG/NAME[@REVISION]`` with
``HF_HUB_OFFLINE=1`` against a cache laid out as the Hub's own (blobs, snapshots of symlinks, refs), built here
from two random Llama commits: a cached model imports (the ref's commit, or the one pinned), an uncached one is
an error that says how to get it, and pickled weights in the snapshot are never read."""
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from chatfactory.formats.hub import parse_hub_id
from chatfactory.store.load import load_model
from conftest import cli_cmd

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world, this is a small test of the tokenizer. " * 3, "The quick brown fox; 12 + 30 = 42."] * 20
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _model_dir(path, seed):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                     "<|im_end|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                         chat_template=CHATML).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=t.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    (path / "pytorch_model.bin").write_bytes(b"not a pickle anyone should load")  # never fetched nor read
    return model


def _into_cache(cache, repo, commit, folder):
    """``folder``'s files as the Hub's cache holds them: content-addressed blobs, a snapshot of symlinks."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, root / "blobs" / blob)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "cache"
    models = {}
    for commit, seed in ((COMMIT_A, 0), (COMMIT_B, 1)):
        models[commit] = _model_dir(tmp / commit, seed)
        root = _into_cache(cache, "org/tiny", commit, tmp / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT_B)
    (root / "refs" / "dev").write_text(COMMIT_A)
    return cache, models


def _import(cache, spec, out):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    return subprocess.run(cli_cmd("import", "--from", spec, "--out", out), env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("spec, commit", [("hf:org/tiny", COMMIT_B), (f"hf:org/tiny@{COMMIT_A}", COMMIT_A),
                                          ("hf:org/tiny@dev", COMMIT_A)])
def test_a_cached_model_imports_offline_at_its_revision(hub, tmp_path, spec, commit):
    cache, models = hub
    p = _import(cache, spec, tmp_path / "run")
    assert p.returncode == 0, p.stdout + p.stderr
    ours, _ = load_model(tmp_path / "run" / "pretrain")
    idx = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        want = models[commit](idx).logits
        assert (ours(idx) - want).abs().max().item() < 1e-4  # this commit's weights, not the other's
        other = models[COMMIT_A if commit == COMMIT_B else COMMIT_B](idx).logits
        assert (ours(idx) - other).abs().max().item() > 1e-2


@pytest.mark.parametrize("spec, says", [
    ("hf:org/missing", ["org/missing is not in the Hugging Face cache", "HF_HUB_OFFLINE=1", "hf download org/missing"]),
    ("hf:org/tiny@v9", ["org/tiny at revision 'v9' is not in the Hugging Face cache", "--revision v9"]),
    ("hf:tiny", ["a Hub model is hf:ORG/NAME"]),
    ("hf:org/tiny@", ["nothing after '@'"]),
])
def test_what_cannot_be_imported_says_why_and_writes_nothing(hub, tmp_path, spec, says):
    cache, _ = hub
    p = _import(cache, spec, tmp_path / "run")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    for s in says:
        assert s in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "run").exists()


def test_hub_ids_are_parsed_strictly():
    assert parse_hub_id("hf:HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert parse_hub_id("hf:Qwen/Qwen3-0.6B@refs/pr/1") == ("Qwen/Qwen3-0.6B", "refs/pr/1")
    with pytest.raises(ValueError, match="hf:ORG/NAME"):
        parse_hub_id("hf:a/b/c")
