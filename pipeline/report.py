"""Self-contained HTML report of the global identities found by a reidstream run.

The report is a single HTML file with inline CSS and every crop inlined as a
``data:image/jpeg;base64,...`` URL, so it can be mailed, archived or opened from a file share without
any other file and without network access. Its layout:

* a summary (global identities, tracklets, identities seen by two or more cameras);
* one ``<section class="identity">`` per global identity — identities spanning more cameras first, then by
  ``first_seen_s`` — whose header gives the global id, its cameras, its time span and its tracklet count;
* inside it, a timeline (``<div class="timeline">``): one lane per camera along the identity's time axis
  (stream seconds), one bar per tracklet from its start to its end, drawn with CSS only;
* then one ``<div class="camera-row">`` per camera, holding one captioned thumbnail per tracklet
  (tracklet id, time span in seconds of stream time, and the cosine score of the join, or ``founded`` for
  the tracklet that founded the identity).

:func:`write_store_report` renders the current identity store (``reidstream report``) at any time: the
most recent identities, a bounded number of tracklets each, saying so on the page.

Inputs are the records of ``identities.json`` and ``links.json`` (see ``docs/ARCHITECTURE.md``). This
module uses only the standard library; importing it never imports torch or OpenCV.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_IDENTITY_FIELDS = ("global_id", "cameras", "tracklets", "first_seen_s", "last_seen_s")
_LINK_FIELDS = ("tracklet_id", "camera", "global_id", "score", "start_s", "end_s")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;background:#f4f5f7;color:#1d2330}
h1{margin:0 0 12px;font-size:24px}
.summary{display:flex;gap:16px;margin:0 0 24px;padding:0;list-style:none}
.summary li{background:#fff;border-radius:8px;padding:10px 16px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
.summary .value{display:block;font-size:24px;font-weight:600}
.summary .label{font-size:12px;color:#5c6370;text-transform:uppercase;letter-spacing:.04em}
.identity{background:#fff;border-radius:8px;margin:0 0 20px;padding:12px 16px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
.identity.multi{border-left:6px solid #2f7de1}
.identity h2{margin:0 0 4px;font-size:18px;font-family:ui-monospace,Menlo,Consolas,monospace}
.identity .meta{margin:0 0 10px;color:#5c6370;font-size:13px}
.camera-row{display:flex;align-items:flex-start;gap:10px;margin:0 0 10px;overflow-x:auto}
.camera-row .camera{flex:0 0 110px;font-weight:600;font-size:13px;padding-top:4px;word-break:break-all}
figure{margin:0;flex:0 0 auto;text-align:center}
figure img,figure .placeholder{height:128px;display:block;border-radius:4px;background:#d8dbe0}
figure .placeholder{width:64px;line-height:128px;font-size:11px;color:#5c6370}
figcaption{font-size:11px;line-height:1.35;color:#3a404c;margin-top:3px;max-width:140px;word-break:break-all}
.empty{color:#5c6370}
.note{margin:-12px 0 20px;color:#5c6370;font-size:13px}
.timeline{margin:0 0 12px}
.lane{display:flex;align-items:center;gap:10px;height:18px;margin:0 0 3px}
.lane .camera{flex:0 0 110px;font-size:12px;font-weight:600;word-break:break-all}
.track{position:relative;flex:1 1 auto;height:12px;background:#eceef1;border-radius:3px}
.bar{position:absolute;top:0;height:12px;min-width:4px;border-radius:3px}
.axis{display:flex;justify-content:space-between;margin-left:120px;font-size:11px;color:#5c6370}
"""

# one muted colour per camera lane (kept away from saturated primaries, which crops often show)
_LANE_COLOURS = ("#2f7de1", "#e1812f", "#3aa17e", "#8a63d2", "#c94f7c", "#6b7a8f")


def _e(value: Any) -> str:
    """HTML-escape ``str(value)``, quotes included (safe in text and in quoted attributes)."""
    return html.escape(str(value), quote=True)


def _require(record: Mapping[str, Any], fields: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming the first of ``fields`` missing from ``record``."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} must be an object, got {type(record).__name__}")
    for name in fields:
        if name not in record:
            raise ValueError(f"{where} lacks the field {name!r}")


def _seconds(value: Any, where: str) -> float:
    """``float(value)`` or a ``ValueError`` naming ``where``."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be a number of seconds, got {value!r}") from exc


def _image_src(data: bytes | None) -> str | None:
    """``data:`` URL of a JPEG (or PNG) crop, or ``None`` when there is nothing displayable."""
    if not data:
        return None
    if data.startswith(_JPEG_MAGIC):
        mime = "image/jpeg"
    elif data.startswith(_PNG_MAGIC):
        mime = "image/png"
    else:
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _score_text(score: Any) -> str:
    """Caption of a link's cosine score: ``score 0.912``, or ``founded`` for ``None``."""
    if score is None:
        return "founded"
    try:
        return f"score {float(score):.3f}"
    except (TypeError, ValueError):
        return f"score {score}"


def _figure(link: Mapping[str, Any], thumbnails: Mapping[str, bytes]) -> str:
    """``<figure>`` of one tracklet: its crop (or a placeholder) captioned with id, time span and score."""
    tracklet_id = str(link["tracklet_id"])
    start_s = _seconds(link["start_s"], f"link {tracklet_id!r} start_s")
    end_s = _seconds(link["end_s"], f"link {tracklet_id!r} end_s")
    caption = (
        f'<span class="tid">{_e(tracklet_id)}</span><br>'
        f'<span class="span">{start_s:.1f}–{end_s:.1f} s</span><br>'
        f'<span class="score">{_e(_score_text(link["score"]))}</span>'
    )
    src = _image_src(thumbnails.get(tracklet_id))
    if src is None:
        if tracklet_id in thumbnails:
            log.warning("thumbnail of tracklet %s is neither JPEG nor PNG; showing a placeholder", tracklet_id)
        img = '<div class="placeholder" role="img" aria-label="no crop">no crop</div>'
    else:
        img = f'<img src="{src}" alt="crop of tracklet {_e(tracklet_id)}">'
    return (
        f'<figure class="tracklet" data-tracklet-id="{_e(tracklet_id)}">'
        f"{img}<figcaption>{caption}</figcaption></figure>"
    )


def _timeline(gid: str, row_order: list[str], by_camera: Mapping[str, list[Mapping[str, Any]]],
              first_s: float, last_s: float) -> str:
    """``<div class="timeline">`` of one identity: a lane per camera, a bar per tracklet over
    ``[start_s, end_s]`` on the axis ``[first_s, last_s]`` (stream seconds; widened to 1 s if shorter)."""
    lo = first_s
    span = max(last_s - first_s, 1.0)
    lanes = []
    for i, camera in enumerate(row_order):
        colour = _LANE_COLOURS[i % len(_LANE_COLOURS)]
        bars = []
        for link in by_camera[camera]:
            tid = str(link["tracklet_id"])
            start = _seconds(link["start_s"], f"link {tid!r} start_s")
            end = max(_seconds(link["end_s"], f"link {tid!r} end_s"), start)
            left = min(max((start - lo) / span * 100.0, 0.0), 100.0)
            width = min(max((end - start) / span * 100.0, 0.0), 100.0 - left)
            bars.append(f'<div class="bar" data-tracklet-id="{_e(tid)}" title="{_e(tid)}: {start:.1f}–{end:.1f} s" '
                        f'style="left:{left:.3f}%;width:{width:.3f}%;background:{colour}"></div>')
        lanes.append(f'<div class="lane" data-camera="{_e(camera)}"><div class="camera">{_e(camera)}</div>'
                     f'<div class="track">{"".join(bars)}</div></div>')
    axis = f'<div class="axis"><span>{lo:.1f} s</span><span>{lo + span:.1f} s</span></div>'
    return f'<div class="timeline" data-global-id="{_e(gid)}">{"".join(lanes)}{axis}</div>'


def _identity_section(
    identity: Mapping[str, Any], links: list[Mapping[str, Any]], thumbnails: Mapping[str, bytes]
) -> str:
    """``<section>`` of one identity: header, then one row of captioned crops per camera."""
    gid = str(identity["global_id"])
    cameras = [str(c) for c in identity["cameras"]]
    first_s = _seconds(identity["first_seen_s"], f"identity {gid!r} first_seen_s")
    last_s = _seconds(identity["last_seen_s"], f"identity {gid!r} last_seen_s")
    # Rows: the identity's cameras in its (sorted) order, then any camera seen only in the links.
    by_camera: dict[str, list[Mapping[str, Any]]] = {}
    for link in links:
        by_camera.setdefault(str(link["camera"]), []).append(link)
    row_order = [c for c in cameras if c in by_camera] + sorted(c for c in by_camera if c not in cameras)
    rows = []
    for camera in row_order:
        figures = "".join(
            _figure(link, thumbnails)
            for link in sorted(
                by_camera[camera],
                key=lambda r: (_seconds(r["start_s"], f"link {r['tracklet_id']!r} start_s"), str(r["tracklet_id"])),
            )
        )
        rows.append(
            f'<div class="camera-row" data-camera="{_e(camera)}">'
            f'<div class="camera">{_e(camera)}</div>{figures}</div>'
        )
    all_cameras = cameras + [c for c in row_order if c not in cameras]
    multi = " multi" if len(all_cameras) >= 2 else ""
    n_total = int(identity.get("n_tracklets", len(links)) or len(links))
    shown = f" ({len(links)} shown)" if n_total > len(links) else ""
    meta = (
        f"cameras: {_e(', '.join(all_cameras))} · "
        f"seen {first_s:.1f}–{last_s:.1f} s ({last_s - first_s:.1f} s) · "
        f"{n_total} tracklet{'s' if n_total != 1 else ''}{shown}"
    )
    body = "".join(rows) if rows else '<p class="empty">no tracklets</p>'
    timeline = _timeline(gid, row_order, by_camera, first_s, last_s) if rows else ""
    return (
        f'<section class="identity{multi}" data-global-id="{_e(gid)}">'
        f"<h2>{_e(gid)}</h2><p class=\"meta\">{meta}</p>{timeline}{body}</section>"
    )


def write_report(
    path: str | Path,
    identities: list[dict],
    links: list[dict],
    thumbnails: Mapping[str, bytes],
    title: str = "reidstream demo",
    note: str | None = None,
) -> Path:
    """Write a self-contained HTML page showing every global identity and its crops.

    Identities spanning more cameras come first, ties broken by ``first_seen_s`` (then ``global_id``).
    An identity's tracklets are the ``links`` whose ``global_id`` is its id; tracklet ids listed in an
    identity but absent from ``links`` (and links of an unknown identity) are skipped with a warning,
    since their camera and time span are unknown. All text is HTML-escaped; nothing refers to an external
    URL.

    Args:
        path: Output file (``.html``); parent directories are created.
        identities: Records of ``identities.json``: ``global_id`` (str), ``cameras`` (sorted list of str),
            ``tracklets`` (list of tracklet ids), ``first_seen_s``, ``last_seen_s`` (float seconds, stream
            time), ``n_tracklets``.
        links: Records of ``links.json``, one per tracklet: ``tracklet_id``, ``camera``, ``global_id``,
            ``score`` (float cosine similarity, or ``None`` for the tracklet that founded the identity),
            ``start_s``, ``end_s`` (float seconds, stream time); other fields are ignored.
        thumbnails: ``tracklet_id`` → JPEG bytes of one representative crop (PNG is accepted too).
            Missing, empty or undecodable entries are shown as a grey "no crop" placeholder.
        title: Page title and heading.
        note: A line shown under the summary (e.g. which part of a large store the page shows).

    Returns:
        The path written.

    Raises:
        ValueError: A record lacks a required field, a time is not a number, or two identities share a
            ``global_id``.
        OSError: The file cannot be written.

    Example:
        >>> write_report("out/report.html", identities, links, {"left-3": jpeg_bytes})  # doctest: +SKIP
        PosixPath('out/report.html')
    """
    out = Path(path)
    for i, identity in enumerate(identities):
        _require(identity, _IDENTITY_FIELDS, f"identities[{i}]")
    for i, link in enumerate(links):
        _require(link, _LINK_FIELDS, f"links[{i}]")

    known = {str(identity["global_id"]) for identity in identities}
    if len(known) != len(identities):
        raise ValueError("identities contain a duplicate global_id")
    links_by_identity: dict[str, list[Mapping[str, Any]]] = {}
    for link in links:
        gid = str(link["global_id"])
        if gid not in known:
            log.warning("link of tracklet %s names unknown identity %s; skipped", link["tracklet_id"], gid)
            continue
        links_by_identity.setdefault(gid, []).append(link)
    for identity in identities:
        gid = str(identity["global_id"])
        linked = {str(link["tracklet_id"]) for link in links_by_identity.get(gid, [])}
        missing = [str(t) for t in identity["tracklets"] if str(t) not in linked]
        if missing:
            log.warning("identity %s lists tracklets without a link record (skipped): %s", gid, missing)

    def n_cameras(identity: Mapping[str, Any]) -> int:
        own = {str(c) for c in identity["cameras"]}
        seen = {str(link["camera"]) for link in links_by_identity.get(str(identity["global_id"]), [])}
        return len(own | seen)

    def order(identity: Mapping[str, Any]) -> tuple[int, float, str]:
        gid = str(identity["global_id"])
        return (-n_cameras(identity), _seconds(identity["first_seen_s"], f"identity {gid!r} first_seen_s"), gid)

    ordered = sorted(identities, key=order)
    sections = [
        _identity_section(identity, links_by_identity.get(str(identity["global_id"]), []), thumbnails)
        for identity in ordered
    ]
    n_tracklets = sum(len(v) for v in links_by_identity.values())
    n_multi = sum(1 for identity in ordered if n_cameras(identity) >= 2)
    summary = '<ul class="summary">' + "".join(
        f'<li><span class="value" id="{key}">{value}</span><span class="label">{label}</span></li>'
        for key, value, label in (
            ("n-identities", len(ordered), "global identities"),
            ("n-tracklets", n_tracklets, "tracklets"),
            ("n-multi-camera", n_multi, "identities on ≥2 cameras"),
        )
    ) + "</ul>"

    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1>{summary}"
        + (f'<p class="note">{_e(note)}</p>' if note else "")
        + ("".join(sections) if sections else '<p class="empty">no identities</p>')
        + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("report with %d identities and %d tracklets written to %s", len(ordered), n_tracklets, out)
    return out


def write_store_report(
    store: Any,
    path: str | Path,
    limit: int = 100,
    min_cameras: int = 1,
    max_tracklets: int = 50,
    title: str = "reidstream identities",
) -> dict[str, Any]:
    """Render the identities currently in ``store`` with :func:`write_report` (``reidstream report``).

    The page shows the ``limit`` identities with the most recent first sighting (among those seen on at
    least ``min_cameras`` cameras), each with its ``max_tracklets`` most recent tracklets, and says so.
    Reads are bounded by those limits (a page of the first-seen index, then pipelined reads of the
    shown tracklets and crops), so the store may be large and the pipeline may be running.

    Args:
        store: A :class:`pipeline.store.IdentityStore`.
        path: Output HTML file.
        limit: Most identities shown, >= 1.
        min_cameras: Only identities seen on this many cameras, >= 1.
        max_tracklets: Most tracklets shown per identity, >= 1.
        title: Page title.

    Returns:
        ``{"path", "identities": shown, "total": matching identities or None when not counted,
        "tracklets": shown}``.

    Raises:
        ValueError: A limit below 1.
        OSError: The file cannot be written.
    """
    if max_tracklets < 1:
        raise ValueError(f"max_tracklets must be >= 1, got {max_tracklets}")
    page = store.identities_page(0, limit, min_cameras=min_cameras, newest_first=True)
    identities, tids = [], []
    for ident in page.items:
        recent = ident.tracklets[-max_tracklets:]
        tids.extend(recent)
        identities.append({**ident.to_json(), "tracklets": recent})
    links = [lk.to_json() for lk in store.links_of(tids)]
    thumbs = store.thumbnails(tids)
    total = page.total
    scope = "all" if total is not None and total <= len(identities) else \
        f"the {len(identities)} with the most recent first sighting of {total if total is not None else 'more'}"
    cams = f" seen on at least {min_cameras} cameras" if min_cameras > 1 else ""
    note = (f"Showing {scope} identities{cams}, at most {max_tracklets} recent tracklets each "
            f"(reidstream report --limit / --max-tracklets).")
    write_report(path, identities, links, thumbs, title=title, note=note)
    return {"path": str(path), "identities": len(identities), "total": total, "tracklets": len(links)}
