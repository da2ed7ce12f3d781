"""llama.cpp runs what we export: a stage written as GGUF (``chatfactory export --to FILE.gguf``, f16, q8_0, q4_0)
checked with llama.cpp's own tools against our model on the same tokens.

- **Teacher-forced, on held-out text** (TinyStories validation, or ``--text``): our model's log-probabilities are
  written in the format of llama-perplexity's ``--kl-divergence-base`` file (its chunks of ``--ctx`` tokens, the
  second half of each scored, bos in front where the tokenizer adds one), and ``llama-perplexity
  --kl-divergence`` runs the exported file over the same tokens: "Same top p" is how often llama.cpp's top-1
  token is ours, and its PPL over ours gives its bits/byte over ours (the same tokens and bytes).
- **Tokenizer**: llama-server's ``/tokenize`` of 20 texts (English, code, Chinese, emoji) against ours.
- **Chat**: 20 prompts through llama-server's chat API (``--jinja``: the file's own template), greedy, 32
  tokens, against our engine's greedy replies; how many are equal.

    .venv/bin/python bench/gguf_llamacpp.py --run runs/demo --stage sft --llama-bin DIR   # DIR: llama.cpp's build/bin
    .venv/bin/python bench/gguf_llamacpp.py --quick     # smoke test: the demo's stand-in, a few chunks

Targets (issue 27): top-1 agreement >= 99% (f16) and >= 97% (q8_0); bits/byte within 0.5% (f16), 1% (q8_0), 3%
(q4_0) of ours. Last line: ``RESULT f16_top1=… q8_0_top1=… q4_0_top1=… f16_bpb_vs_ours=… q8_0_bpb_vs_ours=…
q4_0_bpb_vs_ours=… q8_0_llama_quantize_top1=… … bpb_ours=… chat_equal_f16=… chat_prompts=… tokenize_equal=…
skipped=…`` (top-1 in percent; ``_llama_quantize_``: llama.cpp's own llama-quantize of our f16 file, where found,
bpb ratios llama.cpp / ours; nan where not measured; skipped: ``llamacpp`` without llama-perplexity and
llama-server in ``--llama-bin`` / ``$LLAMA_BIN`` / PATH, or ``none``).
"""

import argparse
import gzip
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from serve_real import Server, free_port  # (bench/ is the script's folder, on sys.path)

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared/data/pretrain/tinystories/tinystories_sample.jsonl.gz"
TEXTS = ["Hello world, this is a test.", "def f(x):\n    return x ** 2  # square", "The quick brown fox, 12345 times.",
         "中文的句子，还有标点。", "emoji 🙂🚀 and ünïcödé", "  leading spaces\tand\ttabs\n\nnew lines",
         "<|end|> spelled out", "Once upon a time, there was a little girl named Lily.", "3.14159 + 2.71828 = 5.85987",
         "ALL CAPS AND lower", "it's we're they'll I'd", "https://example.com/path?q=1&r=2", "a\u00a0b", "x" * 50,
         "日本語とEnglishの混在", "¿Qué tal? ¡Bien!", "tab\tseparated\tvalues", "line one\nline two\n", "", "end."]
PROMPTS = ["What is the capital of France?", "Say hello.", "Add 2 and 3.", "Name a color.", "What is 7 times 6?",
           "Reverse the word 'cat'.", "Tell me a joke.", "What day comes after Monday?", "Spell 'dog' backwards.",
           "Give me a synonym for happy.", "How many legs does a spider have?", "What is water made of?",
           "Write one word.", "Count from 1 to 5.", "Is the sky blue?", "What is 10 minus 4?",
           "Name an animal that flies.", "Translate 'hello' into French.", "What is the opposite of hot?",
           "Sort these numbers: 3 1 2."]
# --quick: the demo's stand-in, short chunks, every part
QUICK = dict(types="f16,q8_0,q4_0", ctx=64, chunks=2, prompts=3, max_tokens=8)


def held_out_text(path: Path | None, chars: int) -> str:
    """Held-out text: TinyStories' validation rows joined by newlines, a text file, or (neither there) the
    embedded Python documentation, at least ``chars`` characters where there are."""
    path = path or (TINYSTORIES if TINYSTORIES.exists() else None)
    docs = []
    if path is None:
        from chatfactory.data.embedded import pydoc_topics

        docs = list(pydoc_topics())
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("split", "validation") == "validation":
                    docs.append(row["text"])
                if sum(map(len, docs)) > chars:
                    break
    else:
        docs = [path.read_text(encoding="utf-8")]
    return "\n".join(docs)


def text_ids(tok, n: int, path: Path | None) -> list[int]:
    ids = tok.encode(held_out_text(path, 8 * n))
    if len(ids) < n:
        raise SystemExit(f"{path}: {len(ids)} tokens, fewer than the {n} asked for")
    return ids[:n]


def write_kld_base(path: Path, model, tok, ids: list[int], ctx: int, add_bos: bool) -> tuple[float, int]:
    """Our log-probs in llama-perplexity's --kl-divergence-base layout -> (our nats summed over the scored
    positions, the bytes of the tokens they predict). Per chunk of ``ctx`` tokens (bos in front where the
    tokenizer adds one), positions ctx/2 .. ctx-2 each predict the next token; a row holds the scale and the
    least log-prob (two floats) and each id's log-prob as 16 bits over the top 16 nats, as llama.cpp writes it."""
    V = model.cfg.vocab_size
    chunks = len(ids) // ctx
    nv = 2 * ((V + 1) // 2) + 4
    first = ctx // 2
    nll, nbytes = 0.0, 0
    token_bytes = tok.token_bytes
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", ctx, V, chunks))
        f.write(np.asarray(ids[:chunks * ctx], dtype=np.int32).tobytes())
        for c in range(chunks):
            x = list(ids[c * ctx:(c + 1) * ctx])
            if add_bos:  # as the file tells llama-perplexity to
                x[0] = tok.bos_id
            with torch.no_grad():
                logits = model(torch.tensor([x]))[0, first:ctx - 1].double()
            mx, mn = logits.max(-1).values, logits.min(-1).values
            mn = torch.maximum(mn, mx - 16)
            lse = torch.logsumexp(logits - mx[:, None], -1)
            scale = (mx - mn) / 65535.0
            rows = np.zeros((ctx - 1 - first, nv), dtype=np.uint16)
            head = np.stack([scale.numpy(), (mn - mx - lse).numpy()], 1).astype(np.float32)
            rows[:, :4] = head.view(np.uint16)
            q = torch.where(logits > mn[:, None], torch.round((logits - mn[:, None]) / scale[:, None]), 0)
            rows[:, 4:4 + V] = q.clamp(0, 65535).numpy().astype(np.uint16)
            f.write(rows.tobytes())
            target = torch.tensor(x[first + 1:ctx])
            nll += float((mx + lse - logits.gather(1, target[:, None])[:, 0]).sum())
            nbytes += sum(len(token_bytes[t]) for t in x[first + 1:ctx])
    return nll, nbytes


def find_bin(name: str, given: str | None) -> str | None:
    for d in (given, os.environ.get("LLAMA_BIN")):
        if d and (Path(d) / name).exists():
            return str(Path(d) / name)
    return shutil.which(name)


def kl_divergence(binary: str, gguf: Path, base: Path, ctx: int, threads: int) -> dict:
    p = subprocess.run([binary, "-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence", "-c", str(ctx),
                        "-b", str(ctx), "-t", str(threads)], capture_output=True, text=True, timeout=1800)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({p.returncode}):\n{out[-3000:]}")
    # its table's last row holds the running figures over every chunk: PPL(Q), ln(PPL(Q)/PPL(base)), KLD, Same top p
    num = r"([-\d.]+)\s*±\s*[-\d.]+"
    rows = re.findall(rf"^\s*\d+\s+{num}\s+{num}\s+{num}\s+{num}\s*%\s+{num}\s*%", out, re.M)
    if not rows:
        raise SystemExit(f"llama-perplexity printed no table:\n{out[-3000:]}")
    ppl, ln_ratio, kld, _, top1 = map(float, rows[-1])
    return {"top1": top1, "ppl": ppl, "ppl_base": math.exp(math.log(ppl) - ln_ratio), "kld": kld}


def llama_server(binary: str, gguf: Path, ctx: int, threads: int) -> Server:
    port = free_port()
    return Server([binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-c", str(ctx), "-t",
                   str(threads), "-np", "1", "--jinja"], port, "llama-server")


def post(srv: Server, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None)
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--llama-bin", default=None, help="the folder of llama-perplexity and llama-server")
    ap.add_argument("--text", default=None, help="held-out text (default: TinyStories validation)")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity's chunk: its second half is scored")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: the demo's stand-in, tiny sizes")
    a = ap.parse_args()
    if a.quick:
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.run is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the stand-in: tests/builders
            from builders import standin

            a.run = str(standin.demo_run(tmp))
        measure(a, tmp)


def measure(a, tmp: Path) -> None:
    from chatfactory.formats.gguf_export import export_gguf, file_adds_bos
    from chatfactory.inference.engine import Engine
    from chatfactory.inference.sampling import SamplingParams
    from chatfactory.store.load import load_model
    from chatfactory.text.tokenizer import Tokenizer

    run = Path(a.run)
    tok = Tokenizer.load(run / "tokenizer.json")
    model, _ = load_model(run / a.stage)
    model.eval()
    ids = text_ids(tok, a.ctx * a.chunks, Path(a.text) if a.text else None)
    nll, nbytes = write_kld_base(tmp / "ours.kld", model, tok, ids, a.ctx, file_adds_bos(tok))
    scored = (len(ids) // a.ctx) * (a.ctx - 1 - a.ctx // 2)
    bpb_ours = nll / math.log(2) / nbytes
    print(f"ours: {run}/{a.stage}, {a.chunks} chunks of {a.ctx} tokens, the second half of each scored: "
          f"{bpb_ours:.4f} bits/byte")
    perplexity, server = find_bin("llama-perplexity", a.llama_bin), find_bin("llama-server", a.llama_bin)
    quantize = find_bin("llama-quantize", a.llama_bin)
    types = [t for t in a.types.split(",") if t]
    res, chat_equal, tok_equal = {}, float("nan"), float("nan")
    prompts = PROMPTS[:a.prompts]
    ours_chat = None
    if perplexity and server:
        greedy = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, stop_ids=tok.stop_ids)
        outs = Engine(model, vocab_limit=tok.vocab_size).generate(
            [tok.chat_prompt([{"role": "user", "content": p}]) for p in prompts], greedy)
        ours_chat = [tok.decode([t for t in o if t not in tok.stop_ids]) for o in outs]
    for t in types:
        path = tmp / f"{t}.gguf"
        r = export_gguf(run, a.stage, path, t)
        print(f"\n{t}: {path.name}, {r['bytes'] / 2**20:.1f} MiB, {', '.join(r['types'])}")
        if not (perplexity and server):
            continue
        k = res[t] = kl_divergence(perplexity, path, tmp / "ours.kld", a.ctx, a.threads)
        if t != "f16" and quantize and (tmp / "f16.gguf").exists():
            # the reference for a quantized type: llama.cpp's own quantizer on our f16 file
            theirs = tmp / f"{t}-llama-quantize.gguf"
            subprocess.run([quantize, str(tmp / "f16.gguf"), str(theirs), t.upper()], capture_output=True, check=True,
                           timeout=1800)
            q = res[t + "_llamaq"] = kl_divergence(perplexity, theirs, tmp / "ours.kld", a.ctx, a.threads)
            q["bpb_ratio"] = math.log(q["ppl"]) / (nll / scored)
            print(f"  llama-quantize {t.upper()} of our f16 file: top-1 = ours at {q['top1']:.2f}%, bits/byte "
                  f"{q['bpb_ratio']:.4f}x ours, mean KLD {q['kld']:.5f}")
        # llama.cpp's mean nll over ours, computed exactly (the base file keeps log-probs over the top 16 nats only)
        k["bpb_ratio"] = math.log(k["ppl"]) / (nll / scored)
        print(f"  llama.cpp's top-1 = ours at {k['top1']:.2f}% of positions; PPL {k['ppl']:.4f} vs ours "
              f"{math.exp(nll / scored):.4f} -> bits/byte {bpb_ours * k['bpb_ratio']:.4f} "
              f"({k['bpb_ratio']:.4f}x ours); "
              f"mean KLD {k['kld']:.5f}")
        if t == "f16":
            with llama_server(server, path, max(2048, a.ctx), a.threads) as srv:
                ask = {"add_special": False, "parse_special": False}  # spelled special tokens stay text, as ours
                same = [post(srv, "/tokenize", {"content": x, **ask})["tokens"] == tok.encode(x) for x in TEXTS]
                tok_equal = sum(same)
                replies = [post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": p}],
                                                              "max_tokens": a.max_tokens, "temperature": 0})
                           ["choices"][0]["message"]["content"] for p in prompts]
            chat_equal = sum(x == y for x, y in zip(replies, ours_chat))
            print(f"  tokenizer: {tok_equal}/{len(TEXTS)} texts to the same ids; chat: {chat_equal}/{len(prompts)} "
                  f"greedy replies equal ours (the file's template through llama-server --jinja)")
            for p, x, y in list(zip(prompts, replies, ours_chat))[:3]:
                print(f"    {p!r}: llama.cpp {x!r} | ours {y!r}")

    def fig(t, key):
        return res.get(t, {}).get(key, float("nan"))

    line = "RESULT " + " ".join(f"{t}_top1={fig(t, 'top1'):.2f}" for t in ("f16", "q8_0", "q4_0"))
    line += " " + " ".join(f"{t}_bpb_vs_ours={fig(t, 'bpb_ratio'):.4f}" for t in ("f16", "q8_0", "q4_0"))
    line += " " + " ".join(f"{t}_llama_quantize_{k}={fig(t + '_llamaq', key):.4f}" for t in ("q8_0", "q4_0")
                           for k, key in (("top1", "top1"), ("bpb_vs_ours", "bpb_ratio")))
    line += (f" bpb_ours={bpb_ours:.4f} chat_equal_f16={chat_equal} chat_prompts={len(prompts)} "
             f"tokenize_equal={tok_equal} skipped={'none' if perplexity and server else 'llamacpp'}")
    print(line)


if __name__ == "__main__":
    main()
