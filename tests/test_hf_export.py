"""Hugging Face export and import: the exported directory loads in plain transformers (no custom code)
with the same logits, the same chat-template ids and the same greedy tokens; HF GPT-2 / Llama models
built from a config import into a run and round-trip."""
import json
import math

import pytest
import torch

from chatfactory.cli import main as cli_main
from chatfactory.formats.hf import export_run, import_hf
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world, this is a small test of the tokenizer and the template. " * 3,
         "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. Ünïcödé 世界 🙂"] * 20
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": " the quick fox"}, {"role": "user", "content": "what is 12 + 30?\n"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=320)


def _make_run(tmp_path, tok, flavour):
    torch.manual_seed(0)
    # a large init std makes greedy decoding wander over many tokens, so a mismatch would show
    cfg = GPTConfig(flavour=flavour, depth=2, n_embd=64, n_head=2, n_kv_head=1 if flavour == "modern" else 0,
                    vocab_size=384, block_size=96, init_std=0.3)
    model = GPT(cfg).eval()
    run = tmp_path / f"run_{flavour}"
    tok.save(run / "tokenizer.json")
    save_checkpoint(run / "sft", unique_state_dict(model), {"model": cfg.to_dict()})
    return run, model


def _ids(x):
    return list(x["input_ids"] if not isinstance(x, list) else x)


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_export_loads_in_transformers_with_same_logits_template_and_greedy_tokens(tmp_path, tok, flavour):
    run, model = _make_run(tmp_path, tok, flavour)
    out = tmp_path / "hf"
    assert cli_main(["export", "--run", str(run), "--stage", "sft", "--to", str(out)]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).exists(), f
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # no custom code
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    htok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if flavour == "gpt2" else "LlamaForCausalLM")
    assert (htok.bos_token, htok.eos_token, htok.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    assert hf.generation_config.eos_token_id == tok.end_id

    # the chat template renders exactly our ids, with and without the generation prompt
    prompt = _ids(htok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
    assert prompt == tok.chat_prompt(CHAT)
    assert prompt[-1] == tok.special["<|assistant|>"]
    full = CHAT + [{"role": "assistant", "content": "42"}]
    assert _ids(htok.apply_chat_template(full, tokenize=True)) == tok.render_chat(full)[0]
    # plain text opens with <|bos|> as our pretraining documents do
    assert htok("The quick fox").input_ids == [tok.bos_id] + tok.encode("The quick fox")
    assert htok.decode(tok.encode("Ünïcödé 世界 🙂")) == "Ünïcödé 世界 🙂"

    idx = torch.tensor([prompt])
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
        assert diff < 1e-4, diff
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=24,
                             do_sample=False)[0, len(prompt):].tolist()
    ours = Engine(model).generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop_ids=(tok.end_id,)))[0]
    assert len(set(ours)) > 3  # not a degenerate repeat of one token
    # ids from two implementations (logits within 1e-4 above): equal wherever no step's top two logits lie that
    # close, which the large init std makes improbable
    assert theirs == ours


def test_export_errors_name_the_problem(tmp_path, tok):
    run, _ = _make_run(tmp_path, tok, "gpt2")
    with pytest.raises(Exception, match="model.safetensors"):
        export_run(run, "ppo", tmp_path / "x")  # no such stage
    (run / "sft" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(Exception, match=r"sft/model.safetensors.*(corrupt|truncated)"):
        export_run(run, "sft", tmp_path / "x")


def _hf_byte_level_tokenizer(path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return t.get_vocab_size()


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_import_random_hf_model_round_trips(tmp_path, flavour):
    torch.manual_seed(0)
    src = tmp_path / "src"
    n_tok = _hf_byte_level_tokenizer(src)
    V = 304 if flavour == "gpt2" else n_tok  # gpt2: a padded table with spare rows; llama: exactly the tokenizer
    if flavour == "gpt2":
        hcfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       bos_token_id=0, eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(hcfg).eval()
    else:
        hcfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(hcfg).eval()
    hf.save_pretrained(src)
    run = tmp_path / "run"
    assert cli_main(["import", "--from", str(src), "--out", str(run)]) == 0

    ours, info = load_model(run / "pretrain")
    tok = Tokenizer.load(run / "tokenizer.json")
    assert info["added_tokens"] == SPECIAL_TOKENS
    # the new special tokens come after the foreign vocabulary, which keeps its ids
    assert [tok.special[t] for t in SPECIAL_TOKENS] == list(range(n_tok, n_tok + len(SPECIAL_TOKENS)))
    assert tok.special["<|endoftext|>"] < n_tok  # the foreign tokenizer's own special token keeps its id
    assert ours.cfg.vocab_size == max(V, n_tok + len(SPECIAL_TOKENS))
    text = "The quick brown fox jumps"
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    idx = torch.tensor([tok.encode(text) + [tok.end_id]])
    with torch.no_grad():
        theirs = hf(idx[:, :-1]).logits
        mine = ours(idx)
    # every token of the foreign vocabulary keeps its logit (spare rows past it were reused for the specials)
    assert (mine[:, :-1, :n_tok] - theirs[..., :n_tok]).abs().max().item() < 1e-4
    # new rows are the mean embedding (or a copy of the model's own bos/eos): logits ordinary, not garbage
    new = mine[0, :, n_tok:n_tok + len(SPECIAL_TOKENS)]
    assert new.abs().max() < mine[0].abs().max() + 1e-6
    if flavour == "gpt2":  # its config names bos = eos = 0: "<|bos|> text" reads as "bos text" did
        with torch.no_grad():
            a = ours(torch.tensor([[tok.bos_id] + tok.encode(text)]))[..., :n_tok]
            b = hf(torch.tensor([[0] + tok.encode(text)])).logits[..., :n_tok]
        assert (a - b).abs().max().item() < 1e-4
        assert (mine[..., tok.end_id] - mine[..., 0]).abs().max().item() < 1e-5  # <|end|> scores as eos did

    # and out again: the re-exported model agrees with ours on every column
    out = tmp_path / "back"
    export_run(run, "pretrain", out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(idx).logits - mine).abs().max().item() < 1e-4

    if flavour == "llama":  # later stages take it as it is: SFT fine-tunes the imported model
        from chatfactory.config import load_config
        from chatfactory.train.sft import run_sft

        chat = tmp_path / "chat.jsonl"
        chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                         {"role": "assistant", "content": w}]}) + "\n"
                                for w in ["fox", "dog", "quick", "brown", "lazy", "hello"] * 4))
        cfg = load_config(str(run / "config.yaml"), [f"sft.data={chat}", "sft.steps=3", "sft.batch_size=4",
                                                     "sft.seq_len=32", "sft.eval_every=0", "sft.ckpt_every=0",
                                                     "sft.progress=false", "sft.val_fraction=0.2"])
        res = run_sft(cfg, run)
        tuned, _ = load_model(run / "sft")
        assert tuned.cfg == ours.cfg
        # it fine-tuned the imported weights: each tensor moved, a little (3 steps), from where the import put it
        start = dict(ours.named_parameters())
        moved = {n: ((p - start[n]).abs().max() / start[n].abs().max()).item() for n, p in tuned.named_parameters()}
        assert 0 < min(moved.values()) and max(moved.values()) < 0.2, moved
        # a random model's next-token loss is about ln V (uniform); three small steps leave it there
        assert abs(res["loss"] - math.log(ours.cfg.vocab_size)) < 0.5 and abs(res["val_loss"] - res["loss"]) < 0.5
        # and the tuned stage exports like any other: transformers computes our logits
        export_run(run, "sft", tmp_path / "tuned")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
        with torch.no_grad():
            assert (again(idx).logits - tuned(idx)).abs().max().item() < 1e-4


def test_import_errors_name_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(src, tmp_path / "run")
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config.json.*bert"):
        import_hf(src, tmp_path / "run")
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 2,
                                                 "vocab_size": 300, "n_positions": 32}))
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle"):
        import_hf(src, tmp_path / "run")
    (src / "model.safetensors").write_bytes(b"\x01" * 20)
    with pytest.raises(ValueError, match="model.safetensors.*corrupt"):
        import_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing half-written


CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral's own: [INST] … [/INST], the system text folded into the first user turn, and spaces around
# the markers that BPE must see joined to the message text (a cut there would change the ids)
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_import_hf_chat_model_keeps_its_template(tmp_path, family):
    """A chat model's directory (a random Qwen2 with q/k/v biases and a tied head, or a Mistral) imports
    with its own template: same logits, tokens, chat ids and greedy tokens as transformers, and back."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if family == "qwen2" else ["<s>", "</s>", "<unk>"]
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "src"
    if family == "qwen2":  # Qwen2-Instruct's settings: no bos, pad = <|endoftext|>, eos = <|im_end|>
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                                    pad_token="<|endoftext|>", chat_template=CHATML)
    else:  # pad = eos, as many chat models ship: the import must choose another pad
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                    pad_token="</s>", chat_template=MISTRAL)
    fast.save_pretrained(src)
    torch.manual_seed(0)
    common = dict(vocab_size=t.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=20000.0)
    if family == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=4096))
    hf.eval().save_pretrained(src)

    run = tmp_path / "run"
    assert cli_main(["import", "--from", str(src), "--out", str(run)]) == 0
    ours, info = load_model(run / "pretrain")
    tok = Tokenizer.load(run / "tokenizer.json")
    assert info["added_tokens"] == [] and info["chat_template"] and tok.vocab_size == t.get_vocab_size()
    assert ours.cfg.qkv_bias == ours.cfg.tie_embeddings == (family == "qwen2")
    assert tok.pad_id != tok.end_id and tok.end_id == t.token_to_id(fast.eos_token)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    conv = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"},
            {"role": "user", "content": " what is 12 + 30?\n"}]
    prompt = tok.chat_prompt(conv)
    assert prompt == hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    ids, mask = tok.render_chat(conv[:2])
    assert ids == hf_tok.apply_chat_template(conv[:2], tokenize=True, return_dict=True)["input_ids"][:len(ids)]
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("the quick fox" if family == "qwen2"
                                                             else " the quick fox") + [tok.end_id]
    x = torch.tensor([tok.encode(TEXTS[1])])
    assert x.tolist()[0] == hf_tok(TEXTS[1], add_special_tokens=False).input_ids
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)
    theirs = theirs[0, len(prompt):].tolist()
    assert Engine(ours).generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0] == theirs

    out = tmp_path / "back"  # and out again, template included
    export_run(run, "pretrain", out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(back).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
    assert back_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"] == prompt
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max().item() < 1e-4
