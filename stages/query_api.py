"""The operator HTTP API (FastAPI): routes, request and response models (see :mod:`stages.query`).

Every route has a summary and a pydantic response model, so ``/openapi.json`` documents the API.
Handlers are thin: they validate, call the functions of :mod:`stages.query` and map the store's
errors to status codes (unknown id 404, merged-away id 409, invalid input 422). Importing this module
imports FastAPI but neither torch nor OpenCV; ``POST /search`` with crops imports them when it runs.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Body, FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.store import IdentityNotFoundError, IdentityRetiredError, IdentityStore
from stages import query

log = logging.getLogger(__name__)

MAX_CROPS = 64  # crops per search request
MAX_CROP_BYTES = 8 * 1024 * 1024  # bytes per uploaded crop
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# models
class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class IdentityOut(_Out):
    global_id: str = Field(..., description="Global identity id (G + 6 digits).")
    cameras: list[str] = Field(..., description="Cameras it was seen on, sorted.")
    tracklets: list[str] = Field(..., description="Member tracklet ids, by start.")
    first_seen_s: float = Field(..., description="First sighting, stream seconds.")
    last_seen_s: float = Field(..., description="Last sighting, stream seconds.")
    n_tracklets: int = Field(..., description="Number of member tracklets.")
    merged_from: str | None = Field(None, description="The id asked for, when it was merged into this one.")


class _PageOut(_Out):
    total: int | None = Field(..., description="Matches in all pages; null when counting needs a full scan.")
    offset: int = Field(..., description="Rows skipped before this page.")
    limit: int | None = Field(..., description="Page size asked for.")
    next_offset: int | None = Field(..., description="`offset` of the next page; null on the last one.")


class IdentityPage(_PageOut):
    items: list[IdentityOut]


class SightingOut(_Out):
    tracklet_id: str
    camera: str
    track_id: int = Field(..., description="The camera tracker's id of the track.")
    global_id: str
    score: float | None = Field(..., description="Cosine of the join; null for the founding tracklet.")
    start_s: float = Field(..., description="First frame, stream seconds.")
    end_s: float = Field(..., description="Last frame, stream seconds.")
    thumbnail_url: str | None = Field(..., description="Path of its JPEG crop; null when none is stored.")


class SightingPage(_PageOut):
    camera: str
    items: list[SightingOut]


class TimelineOut(_PageOut):
    global_id: str
    merged_from: str | None
    cameras: list[str]
    first_seen_s: float
    last_seen_s: float
    n_tracklets: int
    sightings: list[SightingOut] = Field(..., description="Tracklets ordered by start, then id.")


class CropOut(_Out):
    tracklet_id: str
    start_s: float
    end_s: float
    score: float | None
    thumbnail_url: str


class CropsOut(_Out):
    global_id: str
    merged_from: str | None
    cameras: dict[str, list[CropOut]] = Field(..., description="Camera → its crops by start.")


class LinkOut(_Out):
    tracklet_id: str
    camera: str
    track_id: int
    global_id: str
    score: float | None
    start_s: float
    end_s: float
    frames: list[int] = Field(..., description="Source-video frame indices of the crops.")
    boxes: list[list[float]] = Field(..., description="[x1, y1, x2, y2] source-video pixels per crop.")


class LinkPage(_PageOut):
    items: list[LinkOut]


class TrackletOut(LinkOut):
    identity_cameras: list[str]
    closed_wall_s: float = Field(..., description="Unix seconds the camera closed the tracklet.")
    linked_wall_s: float = Field(..., description="Unix seconds the matcher linked it.")


class AuditOut(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str = Field(..., description="Stream id of the record.")
    kind: Literal["merge", "split"]
    from_: str = Field(..., alias="from", description="The identity merged away or split.")
    into: str | list[str] = Field(..., description="Survivor of a merge; identities of a split.")
    tracklets: list[str]
    wall_s: float = Field(..., description="Unix seconds of the change.")
    reason: str = Field(..., description="`reassociation` (the matcher) or `operator`.")


class ConstraintOut(_Out):
    kind: Literal["must", "cannot"] = Field(..., description="must-link or cannot-link between `a` and `b`.")
    a: list[str] = Field(..., description="Tracklet ids.")
    b: list[str] = Field(..., description="Tracklet ids.")
    audit_id: str | None = Field(..., description="Stream id of the audit record of the decision.")
    wall_s: float = Field(..., description="Unix seconds of the decision.")
    operator: str


class _OperatorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    reason: str = Field("", max_length=2000, description="Free-text note kept in the audit record.")
    operator: str = Field(..., min_length=1, max_length=200, description="Who decides.")


class MergeRequest(_OperatorRequest):
    from_: list[str] = Field(..., alias="from", min_length=1, max_length=1000,
                             description="Identities whose tracklets move into the identity of the path.")


class SplitRequest(_OperatorRequest):
    tracklets: list[str] = Field(..., min_length=1, max_length=10000,
                                 description="Member tracklets that move to a new identity.")


class OperatorOut(_Out):
    kind: Literal["merge", "split"]
    global_id: str = Field(..., description="Survivor of a merge; the identity split.")
    new_global_id: str | None = Field(..., description="The identity a split created.")
    moved: list[str] = Field(..., description="Tracklets that changed identity.")
    audit_ids: list[str]
    constraints: list[ConstraintOut]
    identity: IdentityOut | None = Field(..., description="`global_id` afterwards.")
    new_identity: IdentityOut | None = Field(..., description="The new identity of a split.")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracklet_id: str = Field(..., min_length=1, description="A linked tracklet whose embedding is the query.")
    k: int = Field(10, ge=1, le=query.MAX_K, description="How many identities.")


class SearchQueryOut(_Out):
    tracklet_id: str | None
    crops: int = Field(..., description="Crops uploaded (0 for a tracklet query).")


class SearchHit(_Out):
    global_id: str
    score: float = Field(..., description="Mean cosine of the query to the identity's members.")
    cameras: list[str]
    n_tracklets: int
    best_tracklet: str = Field(..., description="The member most similar to the query.")
    best_score: float
    compared: int = Field(..., description="Members the score averages over.")


class SearchOut(_Out):
    query: SearchQueryOut
    k: int
    space: Literal["scoring space", "cosine"] = Field(
        ..., description="Compared in the matcher's saved scoring space, or plain cosine when none is saved.")
    results: list[SearchHit]


_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "crops": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": f"JPEG or PNG crops of one person, in time order (1..{MAX_CROPS})."},
                    "tracklet_id": {"type": "string", "description": "Instead of crops: a linked tracklet."},
                    "k": {"type": "integer", "minimum": 1, "maximum": query.MAX_K, "default": 10},
                },
            }},
        },
    },
}


# --------------------------------------------------------------------------------------------------
def _stored(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a query function, mapping the store's errors to HTTP errors."""
    try:
        return fn(*args, **kwargs)
    except IdentityRetiredError as exc:
        raise HTTPException(409, str(exc)) from None
    except IdentityNotFoundError as exc:
        raise HTTPException(404, str(exc.args[0] if exc.args else exc)) from None
    except ValueError as exc:  # SearchError included
        raise HTTPException(422, str(exc)) from None


def _found(value: Any, missing: str) -> Any:
    """``value``, or a 404 saying ``missing`` when the query found nothing (None)."""
    if value is None:
        raise HTTPException(404, missing)
    return value


def _check_image(data: bytes, i: int, name: str) -> None:
    """422 unless ``data`` is a JPEG or PNG that OpenCV decodes (BGR)."""
    import cv2
    import numpy as np

    label = f"crop {i}" + (f" ({name})" if name else "")
    if not data:
        raise HTTPException(422, f"{label} is empty")
    if len(data) > MAX_CROP_BYTES:
        raise HTTPException(422, f"{label} is larger than {MAX_CROP_BYTES // (1024 * 1024)} MiB")
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
        raise HTTPException(422, f"{label} is neither a JPEG nor a PNG image")
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
        raise HTTPException(422, f"{label} is not a decodable image")


def _warm(index: Any) -> None:
    """Build the search index ahead of the first search (see :func:`build_app`)."""
    import redis

    t = time.perf_counter()
    try:
        index.refresh()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("api: search index not built at start (Redis: %s); the first search builds it", exc)
        return
    except ValueError as exc:  # SearchError: stored embeddings the index cannot take; searches say so too
        log.warning("api: search index not built at start: %s", exc)
        return
    log.info("api: search index of %d identities built in %.1f s", len(index), time.perf_counter() - t)


def build_app(store: IdentityStore, token: str | None = None, reid: Any = None, embedder: Any = None) -> FastAPI:
    """The operator API over ``store`` (arguments as :func:`stages.query.create_app`).

    When the server starts (the app's lifespan, as ``uvicorn`` runs it) the search index is built on a
    background thread, so that the first search by example does not wait for it (19 s at 10⁶ stored
    tracklets); a search that comes meanwhile waits for the build, and if Redis cannot be read then,
    the first search builds it. ``app.state.search_index`` is the index; ``app.state.warming`` the
    thread that builds it.
    """
    from stages.matcher.search import SearchIndex

    search_index = SearchIndex(store)  # kept current from Redis at each search

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.warming = threading.Thread(target=_warm, args=(search_index,), name="search-index-warm",
                                             daemon=True)
        app.state.warming.start()
        yield

    app = FastAPI(title="reidstream operator API", version="2", lifespan=lifespan,
                  description="Global identities, sightings, search by example and operator merges/splits.")
    app.state.search_index = search_index
    lock = threading.Lock()
    loaded: dict[str, Any] = {"embedder": embedder}

    def get_embedder() -> Any:
        with lock:
            if loaded["embedder"] is not None:
                return loaded["embedder"]
            if reid is None:
                raise HTTPException(503, "search by crops needs a re-id model: serve the API with a config "
                                         "(reidstream api --config C)")
            from pipeline.cli_common import expected_errors
            from stages.reid.embedder import CropEmbedder

            try:
                made = CropEmbedder.from_config(reid)
                made.setup()
            except (ValueError, ImportError, *expected_errors()) as exc:
                log.warning("api: cannot load the re-id model for search by crops: %s", exc)
                raise HTTPException(503, f"the re-id model cannot be loaded: {exc}") from None
            loaded["embedder"] = made
            return made

    if token:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next: Any) -> Any:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.get("/healthz", summary="Redis is reachable")
    def healthz() -> dict[str, Any]:
        import redis

        try:
            store.r.ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise HTTPException(503, f"Redis unavailable: {exc}") from None
        return {"ok": True}

    @app.get("/identities", response_model=IdentityPage, summary="A page of global identities, with filters")
    def get_identities(
        offset: int = Query(0, ge=0, description="Matches to skip."),
        limit: int = Query(50, ge=1, le=query.MAX_PAGE, description="Page size."),
        camera: str | None = Query(None, description="Only identities seen on this camera."),
        since: float | None = Query(None, description="Only identities last seen at or after this (stream s)."),
        until: float | None = Query(None, description="Only identities first seen at or before this (stream s)."),
        min_cameras: int = Query(1, ge=1, description="Only identities seen on this many cameras."),
        newest_first: bool = Query(False, description="Order by first sighting descending."),
    ) -> Any:
        return _stored(query.identities, store, min_cameras, offset=offset, limit=limit, camera=camera,
                       since_s=since, until_s=until, newest_first=newest_first)

    @app.get("/identities/{global_id}", response_model=IdentityOut, summary="One identity (follows merges)")
    def get_identity(global_id: str) -> Any:
        return _found(query.identity(store, global_id),
                      f"identity {global_id!r} is unknown")

    @app.get("/identities/{global_id}/timeline", response_model=TimelineOut,
             summary="An identity's sightings ordered by start time")
    def get_timeline(global_id: str, offset: int = Query(0, ge=0),
                     limit: int = Query(query.MAX_PAGE, ge=1, le=10 * query.MAX_PAGE)) -> Any:
        return _found(_stored(query.timeline, store, global_id, offset, limit),
                      f"identity {global_id!r} is unknown")

    @app.get("/identities/{global_id}/crops", response_model=CropsOut, summary="An identity's crops per camera")
    def get_crops(global_id: str, camera: str | None = Query(None, description="Only this camera.")) -> Any:
        return _found(query.crops(store, global_id, camera),
                      f"identity {global_id!r} is unknown")

    @app.post("/identities/{global_id}/merge", response_model=OperatorOut,
              summary="Operator merge: move every tracklet of the `from` identities into this one")
    def post_merge(global_id: str, body: MergeRequest = Body(...)) -> Any:
        return _stored(query.merge, store, global_id, body.from_, body.operator, body.reason)

    @app.post("/identities/{global_id}/split", response_model=OperatorOut,
              summary="Operator split: move the given tracklets to a new identity")
    def post_split(global_id: str, body: SplitRequest = Body(...)) -> Any:
        return _stored(query.split, store, global_id, body.tracklets, body.operator, body.reason)

    @app.get("/cameras/{camera}/sightings", response_model=SightingPage,
             summary="A camera's tracklets starting in a time range")
    def get_camera_sightings(
        camera: str,
        since: float | None = Query(None, description="Earliest start, stream seconds."),
        until: float | None = Query(None, description="Latest start, stream seconds."),
        offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=query.MAX_PAGE),
    ) -> Any:
        return _found(_stored(query.camera_sightings, store, camera, since, until, offset, limit),
                      f"no sightings of camera {camera!r} are stored")

    @app.post("/search", response_model=SearchOut, openapi_extra=_SEARCH_BODY,
              summary="Search by example: top-k identities for uploaded crops or a tracklet id")
    async def post_search(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        uploads: list[bytes] = []
        if ctype == "application/json":
            try:
                raw = await request.json()
            except ValueError:
                raise HTTPException(422, "the body is not valid JSON") from None
            try:
                req = SearchRequest.model_validate(raw)
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
            tracklet_id, k = req.tracklet_id, req.k
        elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await request.form(max_files=MAX_CROPS, max_fields=16)
            tracklet_id = form.get("tracklet_id") or None
            if tracklet_id is not None and not isinstance(tracklet_id, str):
                raise HTTPException(422, "tracklet_id must be a text field")
            k_text = form.get("k", "10")
            try:
                k = int(k_text) if isinstance(k_text, str) else -1
            except ValueError:
                raise HTTPException(422, f"k must be an integer in 1..{query.MAX_K}, got {k_text!r}") from None
            for i, item in enumerate(form.getlist("crops")):
                if isinstance(item, str):
                    raise HTTPException(422, f"crop {i} must be an uploaded file, not a text field")
                data = await item.read()
                _check_image(data, i, item.filename or "")
                uploads.append(data)
        else:
            raise HTTPException(415, "send application/json {\"tracklet_id\", \"k\"} or multipart/form-data "
                                     "with files `crops` (or a field `tracklet_id`) and `k`")
        if not 1 <= k <= query.MAX_K:
            raise HTTPException(422, f"k must be an integer in 1..{query.MAX_K}, got {k}")
        if uploads and tracklet_id is not None:
            raise HTTPException(422, "give either crops or a tracklet_id, not both")
        if not uploads and tracklet_id is None:
            raise HTTPException(422, "give crops (JPEG/PNG files in `crops`) or a tracklet_id")
        if tracklet_id is not None:
            return await run_in_threadpool(_stored, query.search, store, k, tracklet_id=tracklet_id,
                                         index=search_index)
        model = await run_in_threadpool(get_embedder)
        try:
            vector = await run_in_threadpool(model.embed, uploads)
        except ValueError as exc:
            raise HTTPException(422, f"the crops cannot be embedded: {exc}") from None
        return await run_in_threadpool(_stored, query.search, store, k, vector=vector, n_crops=len(uploads),
                                     index=search_index)

    @app.get("/audit", response_model=list[AuditOut], summary="Merges and splits, oldest first")
    def get_audit(limit: int | None = Query(None, ge=1, description="The newest N records only.")) -> Any:
        return query.audit(store, limit)

    @app.get("/constraints", response_model=list[ConstraintOut],
             summary="Operators' must-link and cannot-link decisions, oldest first")
    def get_constraints() -> Any:
        return query.constraints(store)

    @app.get("/links", response_model=LinkPage, summary="A page of tracklet → identity links")
    def get_links(cross_camera: bool = Query(False, description="Only identities on two or more cameras."),
                  camera: str | None = Query(None, description="Only this camera's tracklets (by start)."),
                  offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=query.MAX_PAGE)) -> Any:
        return _stored(query.links, store, cross_camera, camera, offset=offset, limit=limit)

    @app.get("/tracklets/{tracklet_id}", response_model=TrackletOut, summary="One tracklet's link")
    def get_tracklet(tracklet_id: str) -> Any:
        return _found(query.tracklet(store, tracklet_id),
                      f"tracklet {tracklet_id!r} is not linked")

    @app.get("/tracklets/{tracklet_id}/thumbnail", response_class=Response, summary="A tracklet's JPEG crop",
             responses={200: {"content": {"image/jpeg": {}}, "description": "The JPEG crop (BGR-encoded)."}})
    def get_thumbnail(tracklet_id: str) -> Response:
        data = store.thumbnail(tracklet_id)
        if data is None:
            raise HTTPException(404, f"no thumbnail for {tracklet_id!r}")
        return Response(content=data, media_type="image/jpeg")

    return app
