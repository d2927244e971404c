"""Operator queries over the identity store, shared by ``reidstream query …`` and the HTTP API.

Every function returns JSON-ready objects; the HTTP API (``reidstream api``, :func:`create_app`,
built in :mod:`stages.query_api`) serves the same answers, documented in ``/openapi.json``:

=====================================  ====================================================================
``GET /healthz``                       Redis reachable
``GET /identities``                    a page of identities by first sighting (``offset``, ``limit`` <= 1000,
                                       ``newest_first``), filters ``camera``, ``since`` / ``until`` (span
                                       overlaps, stream seconds) and ``min_cameras``; ``total``, ``next_offset``
``GET /identities/{id}``               one identity; an id merged away answers with the identity it was
                                       merged into (``merged_from`` set); 404 when unknown
``GET /identities/{id}/timeline``      its tracklets ordered by start: camera, span, score, thumbnail URL
``GET /identities/{id}/crops``         its thumbnails grouped by camera (``?camera=``)
``POST /identities/{id}/merge``        operator merge: ``{"from": [ids], "reason", "operator"}``
``POST /identities/{id}/split``        operator split: ``{"tracklets": [ids], "reason", "operator"}`` → new id
``GET /cameras/{camera}/sightings``    a camera's tracklets starting in ``[since, until]``, paged
``POST /search``                       search by example: uploaded crops (multipart ``crops``) or a
                                       ``tracklet_id`` (JSON or form), ``k`` in 1..100 → top-k identities
``GET /audit``                         merges and splits (matcher and operators), oldest first (``?limit=``)
``GET /constraints``                   operators' must-link / cannot-link decisions, oldest first
``GET /links``                         a page of tracklet → identity links (``cross_camera``, ``camera``)
``GET /tracklets/{id}``                one link, 404 when unknown
``GET /tracklets/{id}/thumbnail``      its JPEG crop
=====================================  ====================================================================

Unknown ids answer 404, an id merged away given to merge/split 409, invalid input 422 with a message.
With a token configured (``api.token``), every route, ``/openapi.json`` and ``/docs`` included, needs
``Authorization: Bearer <token>``; a missing or wrong token gets 401 (compared in constant time).

No listing reads every link: see the operator queries of :class:`pipeline.store.IdentityStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import numpy as np

from pipeline.store import IdentityNotFoundError, IdentityStore, Page, SightingRecord

MAX_PAGE = 1000  # largest page the API serves
MAX_K = 100  # most identities a search returns


def thumbnail_url(tracklet_id: str) -> str:
    """The API path of a tracklet's thumbnail (relative to the API's root)."""
    return f"/tracklets/{quote(tracklet_id, safe='')}/thumbnail"


def _page(page: Page[Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"items": rows, "total": page.total, "offset": page.offset, "limit": page.limit,
            "next_offset": page.next_offset}


def _sighting(s: SightingRecord) -> dict[str, Any]:
    out = s.to_json()
    del out["has_thumbnail"]
    out["thumbnail_url"] = thumbnail_url(s.tracklet_id) if s.has_thumbnail else None
    return out


def identities(store: IdentityStore, min_cameras: int = 1, *, offset: int = 0, limit: int | None = 50,
               camera: str | None = None, since_s: float | None = None, until_s: float | None = None,
               newest_first: bool = False) -> dict[str, Any]:
    """A page of identities as ``identities.json`` objects (see
    :meth:`~pipeline.store.IdentityStore.identities_page` for the filters and their cost).

    Returns:
        ``{"items": [...], "total": int | None, "offset", "limit", "next_offset": int | None}``.

    Raises:
        ValueError: Bad paging or filters.
    """
    page = store.identities_page(offset, limit, camera=camera, since_s=since_s, until_s=until_s,
                                 min_cameras=min_cameras, newest_first=newest_first)
    return _page(page, [i.to_json() for i in page.items])


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


def timeline(store: IdentityStore, global_id: str, offset: int = 0, limit: int | None = None) -> dict[str, Any] | None:
    """An identity's sightings ordered by start, following merges; None when unknown.

    Returns:
        The identity's fields (``global_id``, ``cameras``, ``first_seen_s``, ``last_seen_s``,
        ``n_tracklets``, ``merged_from`` when asked by a merged-away id) and ``sightings``: one object
        per tracklet (``tracklet_id``, ``camera``, ``track_id``, ``global_id``, ``score``, ``start_s``,
        ``end_s``, ``thumbnail_url`` or null), with ``total``, ``offset``, ``limit``, ``next_offset``.

    Raises:
        ValueError: Bad paging.
    """
    current = store.resolve(global_id)
    (ident,) = store.identities_by_id([current]) or (None,)
    page = store.identity_timeline(current, offset, limit) if ident is not None else None
    if ident is None or page is None:
        return None
    out: dict[str, Any] = {"global_id": current, "merged_from": global_id if current != global_id else None,
                           "cameras": ident.cameras, "first_seen_s": ident.first_seen_s,
                           "last_seen_s": ident.last_seen_s, "n_tracklets": ident.n_tracklets}
    out.update(_page(page, [_sighting(s) for s in page.items]))
    out["sightings"] = out.pop("items")
    return out


def crops(store: IdentityStore, global_id: str, camera: str | None = None) -> dict[str, Any] | None:
    """An identity's stored thumbnails grouped by camera (cameras sorted, crops by start), following
    merges; None when unknown.

    Returns:
        ``{"global_id", "merged_from", "cameras": {camera: [{"tracklet_id", "start_s", "end_s",
        "score", "thumbnail_url"}, ...]}}``; tracklets without a stored thumbnail are left out.
    """
    current = store.resolve(global_id)
    page = store.identity_timeline(current)
    if page is None:
        return None
    grouped: dict[str, list[dict[str, Any]]] = {}
    for s in page.items:
        if s.has_thumbnail and (camera is None or s.camera == camera):
            grouped.setdefault(s.camera, []).append({"tracklet_id": s.tracklet_id, "start_s": s.start_s,
                                                     "end_s": s.end_s, "score": s.score,
                                                     "thumbnail_url": thumbnail_url(s.tracklet_id)})
    return {"global_id": current, "merged_from": global_id if current != global_id else None,
            "cameras": {c: grouped[c] for c in sorted(grouped)}}


def camera_sightings(store: IdentityStore, camera: str, since_s: float | None = None, until_s: float | None = None,
                     offset: int = 0, limit: int | None = 100) -> dict[str, Any] | None:
    """A page of a camera's tracklets starting in ``[since_s, until_s]`` (stream seconds), by start;
    None when nothing of ``camera`` is stored.

    Raises:
        ValueError: Bad paging, or ``since_s > until_s``.
    """
    page = store.camera_sightings(camera, since_s, until_s, offset, limit)
    if page is None:
        return None
    return {"camera": camera, **_page(page, [_sighting(s) for s in page.items])}


def audit(store: IdentityStore, limit: int | None = None) -> list[dict[str, Any]]:
    """Merge and split records (``kind``, ``from``, ``into``, ``tracklets``, ``wall_s``, ``reason``:
    ``reassociation`` with ``threshold``, or ``operator`` with ``operator`` and ``note``; stream ``id``),
    oldest first; the newest ``limit`` when given."""
    return store.audit(limit)


def constraints(store: IdentityStore) -> list[dict[str, Any]]:
    """Operators' constraints (``kind``: must / cannot, ``a``, ``b``, ``audit_id``, ``wall_s``,
    ``operator``), oldest first."""
    return [c.to_json() for c in store.constraints()]


def links(store: IdentityStore, cross_camera: bool = False, camera: str | None = None, *, offset: int = 0,
          limit: int | None = None) -> dict[str, Any]:
    """A page of links as ``links.json`` objects: in storage order, by start time with ``camera``.

    Args:
        store: The identity store.
        cross_camera: Only links whose identity spans two or more cameras.
        camera: Only links of this camera.
        offset: Links to skip.
        limit: Page size; None: every link (read in pipelined chunks).

    Raises:
        ValueError: Bad paging.
    """
    page = store.links_page(offset, limit, camera=camera, cross_camera=cross_camera)
    return _page(page, [lk.to_json() for lk in page.items])


def tracklet(store: IdentityStore, tracklet_id: str) -> dict[str, Any] | None:
    """One link with its identity's cameras, or None when the tracklet is not linked."""
    link = store.link(tracklet_id)
    if link is None:
        return None
    ident = store.identity(link.global_id)
    return {**link.to_json(), "identity_cameras": ident.cameras if ident else [link.camera],
            "closed_wall_s": link.closed_wall_s, "linked_wall_s": link.linked_wall_s}


def search(store: IdentityStore, k: int = 10, *, tracklet_id: str | None = None, vector: np.ndarray | None = None,
           n_crops: int = 0, index: Any = None) -> dict[str, Any]:
    """Search by example: the ``k`` identities most like a stored tracklet or an embedded query.

    Give exactly one of ``tracklet_id`` (its stored embedding is the query, and the tracklet itself is
    left out of every score) and ``vector`` (``float32 [D]``, e.g. uploaded crops embedded by
    :class:`stages.reid.embedder.CropEmbedder`). Ranking: through ``index`` (a
    :class:`stages.matcher.search.SearchIndex`, as the API keeps one) when given, else
    :func:`stages.matcher.search.rank_identities` (brute force); the results are the same.

    Returns:
        ``{"query": {"tracklet_id", "crops"}, "k", "space": "scoring space" | "cosine", "results":
        [{"global_id", "score", "cameras", "n_tracklets", "best_tracklet", "best_score", "compared"}]}``.

    Raises:
        IdentityNotFoundError: ``tracklet_id`` is not linked (or has no stored embedding).
        ValueError: Neither or both queries, or ``k`` outside 1..100.
        SearchError: The query cannot be compared with the stored embeddings.
    """
    from stages.matcher.search import load_scoring_space, rank_identities

    if (tracklet_id is None) == (vector is None):
        raise ValueError("give either crops or a tracklet_id (exactly one)")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    exclude: list[str] = []
    if tracklet_id is not None:
        vector = store.embedding(tracklet_id)
        if vector is None:
            raise IdentityNotFoundError(f"tracklet {tracklet_id!r} is not linked")
        exclude = [tracklet_id]
    if index is not None:
        hits = index.rank(vector, k, exclude=exclude)
        space = index.space
    else:
        space = load_scoring_space(store)
        hits = rank_identities(store, vector, k, space=space, exclude=exclude)
    return {"query": {"tracklet_id": tracklet_id, "crops": n_crops}, "k": k,
            "space": "cosine" if space is None else "scoring space", "results": [h.to_json() for h in hits]}


def merge(store: IdentityStore, into: str, sources: Sequence[str], operator: str, note: str = "") -> dict[str, Any]:
    """Operator merge of ``sources`` into ``into`` (see :meth:`~pipeline.store.IdentityStore.operator_merge`).

    Returns:
        The change (``kind``, ``global_id``, ``new_global_id``, ``moved``, ``audit_ids``, ``constraints``)
        and ``identity``: the surviving identity afterwards.

    Raises:
        IdentityNotFoundError, IdentityRetiredError, ValueError: As ``operator_merge``.
    """
    change = store.operator_merge(into, sources, operator, note)
    return {**change.to_json(), "identity": identity(store, into), "new_identity": None}


def split(store: IdentityStore, global_id: str, tracklets: Sequence[str], operator: str,
          note: str = "") -> dict[str, Any]:
    """Operator split of ``tracklets`` off ``global_id`` into a new identity (see
    :meth:`~pipeline.store.IdentityStore.operator_split`).

    Returns:
        The change, ``identity`` (what is left of ``global_id``) and ``new_identity``.

    Raises:
        IdentityNotFoundError, IdentityRetiredError, ValueError: As ``operator_split``.
    """
    change = store.operator_split(global_id, tracklets, operator, note)
    return {**change.to_json(), "identity": identity(store, global_id),
            "new_identity": identity(store, str(change.new_global_id))}


def create_app(store: IdentityStore, token: str | None = None, reid: Any = None, embedder: Any = None) -> Any:
    """The FastAPI application of the operator API over ``store`` (see :mod:`stages.query_api`).

    Args:
        store: The identity store.
        token: Bearer token every request must carry; None serves without authentication.
        reid: The ``reid`` config section (:class:`pipeline.config.ReidConfig`) whose model embeds
            uploaded crops for ``POST /search``; loaded at the first such request.
        embedder: An object with ``embed(crops: list[bytes]) -> float32 [D]`` used instead of ``reid``.
    """
    from stages.query_api import build_app

    return build_app(store, token, reid, embedder)
