"""Operator queries over the identity store: identities, cross-camera links, one tracklet, the audit.

Used by ``reidstream query …`` (table or JSON) and by the HTTP API (``reidstream api``), which
serves the same answers as JSON:

===============================  ===========================================================
``GET /identities``              global identities (``?min_cameras=2`` for cross-camera ones)
``GET /identities/{id}``         one identity; an id merged away answers with the identity it was
                                 merged into (``merged_from`` set); 404 when unknown
``GET /audit``                   merges and splits of the re-association, oldest first (``?limit=``)
``GET /links``                   tracklet → identity links (``?cross_camera=true``, ``?camera=``)
``GET /tracklets/{id}``          one link, 404 when unknown
``GET /tracklets/{id}/thumbnail`` its JPEG crop
``GET /healthz``                 Redis reachable
===============================  ===========================================================

With a token configured (``api.token``), every route, ``/openapi.json`` and ``/docs`` included, needs
``Authorization: Bearer <token>``; a missing or wrong token gets 401 (compared in constant time).
"""

from __future__ import annotations

from typing import Any

from pipeline.store import IdentityStore


def identities(store: IdentityStore, min_cameras: int = 1) -> list[dict[str, Any]]:
    """Identities seen on at least ``min_cameras`` cameras, as ``identities.json`` objects."""
    return [i.to_json() for i in store.identities() if len(i.cameras) >= min_cameras]


def identity(store: IdentityStore, global_id: str) -> dict[str, Any] | None:
    """One identity as an ``identities.json`` object, following merges (an id merged away gives the
    surviving identity, with ``merged_from`` set to the id asked for); None when unknown."""
    current = store.resolve(global_id)
    ident = store.identity(current)
    if ident is None:
        return None
    out = ident.to_json()
    if current != global_id:
        out["merged_from"] = global_id
    return out


def audit(store: IdentityStore, limit: int | None = None) -> list[dict[str, Any]]:
    """Merge and split records (``kind``, ``from``, ``into``, ``tracklets``, ``wall_s``, ``reason``,
    ``threshold``, stream ``id``), oldest first; the newest ``limit`` when given."""
    return store.audit(limit)


def links(store: IdentityStore, cross_camera: bool = False, camera: str | None = None) -> list[dict[str, Any]]:
    """Links as ``links.json`` objects, in storage order.

    Args:
        store: The identity store.
        cross_camera: Only links whose identity spans two or more cameras.
        camera: Only links of this camera.
    """
    out = store.links()
    if camera is not None:
        out = [link for link in out if link.camera == camera]
    if cross_camera:
        spans = {i.global_id: len(i.cameras) for i in store.identities()}
        out = [link for link in out if spans.get(link.global_id, 0) >= 2]
    return [link.to_json() for link in out]


def tracklet(store: IdentityStore, tracklet_id: str) -> dict[str, Any] | None:
    """One link with its identity's cameras, or None when the tracklet is not linked."""
    link = store.link(tracklet_id)
    if link is None:
        return None
    ident = store.identity(link.global_id)
    return {**link.to_json(), "identity_cameras": ident.cameras if ident else [link.camera],
            "closed_wall_s": link.closed_wall_s, "linked_wall_s": link.linked_wall_s}


def create_app(store: IdentityStore, token: str | None = None) -> Any:
    """The FastAPI application of the query API over ``store``.

    Args:
        store: The identity store.
        token: Bearer token every request must carry; None serves without authentication.
    """
    import hmac

    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.responses import JSONResponse

    app = FastAPI(title="reidstream query API", version="1")

    if token:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next: Any) -> Any:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        import redis

        try:
            store.r.ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise HTTPException(503, f"Redis unavailable: {exc}") from None
        return {"ok": True}

    @app.get("/identities")
    def get_identities(min_cameras: int = 1) -> list[dict[str, Any]]:
        return identities(store, min_cameras)

    @app.get("/identities/{global_id}")
    def get_identity(global_id: str) -> dict[str, Any]:
        found = identity(store, global_id)
        if found is None:
            raise HTTPException(404, f"identity {global_id!r} is unknown")
        return found

    @app.get("/audit")
    def get_audit(limit: int | None = None) -> list[dict[str, Any]]:
        if limit is not None and limit < 1:
            raise HTTPException(422, "limit must be >= 1")
        return audit(store, limit)

    @app.get("/links")
    def get_links(cross_camera: bool = False, camera: str | None = None) -> list[dict[str, Any]]:
        return links(store, cross_camera, camera)

    @app.get("/tracklets/{tracklet_id}")
    def get_tracklet(tracklet_id: str) -> dict[str, Any]:
        found = tracklet(store, tracklet_id)
        if found is None:
            raise HTTPException(404, f"tracklet {tracklet_id!r} is not linked")
        return found

    # no return annotation: under `from __future__ import annotations` FastAPI cannot resolve the
    # locally imported Response class and /openapi.json fails with 500
    @app.get("/tracklets/{tracklet_id}/thumbnail", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "The JPEG crop (BGR-encoded)."}})
    def get_thumbnail(tracklet_id: str):  # noqa: ANN202
        data = store.thumbnail(tracklet_id)
        if data is None:
            raise HTTPException(404, f"no thumbnail for {tracklet_id!r}")
        return Response(content=data, media_type="image/jpeg")

    return app
