"""Admin routes: which versions are served, and which battle in the arena.

    POST /v1/admin/reload   {}                 serve the version RUN/versions/serving.json names, now
                                               -> {"object": "reload", "changed", "version", "model", "previous"}
    POST /v1/admin/rollback {"to"?: N}         serve an earlier version (store/versions.py's rules), as
                                               `chatfactory rollback` does, then reload -> as reload
    POST /v1/admin/arena    {"candidate": N} | {"versions": [N, M]} | {"candidate": null}
                                               the arena's pair, loaded and warmed before it opens; null closes it
                                               -> {"object": "arena", "open", "models", "versions"}
    GET  /v1/admin/arena                       the arena's pair

Who may: a caller with the API key only (401 without it or with a wrong one: api.py's check on every /v1/
route), from this server's own origin or an allowed one (guard.py: 403 for a foreign page or Host). A server
started without an API key refuses them all with 403, from loopback too: on a shared machine every local
user and every local proxy is "loopback", and what these routes change (what people are served, which
versions they rank) is the flywheel's decision, not a chat client's. Such a server still follows
serving.json by itself (its watcher), so `chatfactory learn` and `chatfactory rollback` work without them.
"""

from __future__ import annotations

import asyncio

from fastapi import Request as HTTPRequest

from ..store.files import CheckpointError
from .arena_protocol import ArenaSetup, ArenaState, ReloadAnswer, RollbackRequest
from .openapi import doc
from .protocol import APIError, parse_body


def install_admin(kit) -> None:
    svc, app = kit.svc, kit.app

    def hotswap():
        if svc.api_key is None:
            raise APIError(403, "admin routes need an API key: start the server with --api-key KEY (or "
                                "$CHATFACTORY_API_KEY) and send 'Authorization: Bearer KEY'; without one the "
                                "server still follows RUN/versions/serving.json by itself", code="admin_disabled")
        if svc.hotswap is None:
            raise APIError(409, f"this server serves {svc.name} as pinned with --stage, not the run's versions "
                                "(RUN/versions/serving.json): restart it without --stage", code="versions_off")
        return svc.hotswap

    async def act(fn, *args, param: str | None = None):
        """``fn(*args)`` in a thread (loading a version takes seconds): its errors as 4xx naming ``param``."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (ValueError, CheckpointError) as e:  # a version not on record, not servable, a corrupt record
            raise APIError(400, f"{param}: {e}" if param else str(e), param, "invalid_value") from None
        except RuntimeError as e:  # the version loaded but did not generate (warm-up): the old one stays
            raise APIError(500, str(e), param, "version_failed") from None

    @kit.post("/v1/admin/reload", "serve the version RUN/versions/serving.json names (admin)", "AdminEmpty",
              ReloadAnswer, errors=(409, 500))
    async def reload(request: HTTPRequest):
        await kit.read_json(request, empty_ok=True)
        return {"object": "reload", **(await act(hotswap().reload))}

    @kit.post("/v1/admin/rollback", "serve an earlier version again (admin)", "RollbackRequest", ReloadAnswer,
              errors=(409, 500))
    async def rollback(request: HTTPRequest):
        req = parse_body(RollbackRequest, await kit.read_json(request, empty_ok=True))
        return {"object": "reload", **(await act(hotswap().rollback, req.to, param="to"))}

    @kit.post("/v1/admin/arena", "put versions in the arena, or close it (admin)", "ArenaSetup", ArenaState,
              errors=(409, 500))
    async def arena(request: HTTPRequest):
        req = parse_body(ArenaSetup, await kit.read_json(request, empty_ok=True))
        if req.candidate is not None and req.versions is not None:
            raise APIError(400, "candidate: give either 'candidate' (against the served version) or 'versions' "
                                "(two versions), not both", "candidate", "invalid_value")
        if req.versions is not None and req.versions[0] == req.versions[1]:
            raise APIError(400, f"versions: two different versions battle, got {req.versions}", "versions",
                           "invalid_value")
        pair = tuple(req.versions) if req.versions is not None else None
        return await act(hotswap().set_arena, req.candidate, pair,
                         param="versions" if pair is not None else "candidate")

    @app.get("/v1/admin/arena", summary="the arena's versions (admin)", responses=doc(ArenaState, 401, 403, 409))
    async def arena_state():
        return hotswap().arena_state()
