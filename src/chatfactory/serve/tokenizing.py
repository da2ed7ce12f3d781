"""The tokenizer endpoints, as vLLM serves them: lm-eval's local-completions finds them by itself and then
needs no tokenizer files of its own ("remote" tokenizer backend). Text is tokenized as the Hugging Face
export does: spelled-out special tokens are special here. Every version of a run shares its tokenizer."""

from __future__ import annotations

from fastapi import Request as HTTPRequest

from .openapi import doc
from .protocol import APIError, DetokenizeRequest, TokenizeChat, parse_body, parse_tokenize
from .responses import DetokenizeResponse, TokenizeResponse, TokenizerInfo


def install_tokenizer_routes(kit) -> None:
    svc, app, pool = kit.svc, kit.app, kit.pool

    @app.get("/tokenizer_info", summary="the tokenizer and its chat template (vLLM's endpoint)",
             responses=doc(TokenizerInfo, 401, 403))
    async def tokenizer_info():
        return {"tokenizer_class": "chatfactory", **svc.tok.chat_config,
                "model_max_length": svc.block_size, "vocab_size": svc.tok.vocab_size}

    @kit.post("/tokenize", "text, or a conversation rendered by the chat template, to token ids", "TokenizeRequest",
              TokenizeResponse)
    async def tokenize(request: HTTPRequest):
        req = await pool.run(parse_tokenize, await kit.read_json(request))
        if isinstance(req, TokenizeChat):
            ids = await kit.render_chat(kit.messages(req.messages), req.add_generation_prompt is not False)
        else:
            ids = (await pool.run(lambda p: svc.tok.hf.encode(p, add_special_tokens=False), req.prompt)).ids
            if req.add_special_tokens is not False and svc.tok.add_bos:
                ids = [svc.tok.bos_id] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": svc.block_size}

    @kit.post("/detokenize", "token ids to text", "DetokenizeRequest", DetokenizeResponse)
    async def detokenize(request: HTTPRequest):
        ids = (await pool.run(parse_body, DetokenizeRequest, await kit.read_json(request))).tokens

        def decode():  # up to a megabyte of ids: off the event loop
            if any(not 0 <= t < svc.tok.vocab_size for t in ids):
                raise APIError(400, "'tokens' holds an id outside the vocabulary", "tokens", "invalid_value")
            return {"prompt": svc.tok.decode(ids)}
        return await pool.run(decode)
