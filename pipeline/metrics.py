"""Prometheus metrics shared by every reidstream process.

Metrics are instrumented where the work happens (the camera worker counts frames as it reads them,
the matcher counts links as it writes them), labelled by ``stage`` and ``camera``. Each long-running
command serves them over HTTP with :func:`serve`.

Names (all prefixed ``reidstream_``):

=====================================  =========  ==============================================
name                                   type       labels
=====================================  =========  ==============================================
frames_total                           counter    stage, camera
detections_total                       counter    stage, camera
tracklets_total                        counter    stage, camera, outcome (published|too_short|static)
embeddings_total                       counter    stage, camera
links_total                            counter    stage, camera, kind (joined|founded)
dead_letters_total                     counter    stage, reason
rejected_messages_total                counter    stage, kind (oversized|not_json|schema|invalid|embedding|
                                                  output_oversized): poison messages by cause
undelivered_total                      counter    stage, camera: messages the broker never acknowledged
source_incomplete_total                counter    stage, camera: files that ended before their declared
                                                  frame count (truncated or corrupt)
reconnects_total                       counter    stage, camera
dropped_total                          counter    stage, camera, reason
stage_latency_seconds                  histogram  stage, camera
tracklet_link_latency_seconds          histogram  camera (wall clock: tracklet closed → link stored)
reid_batch_size                        histogram  stage
source_up                              gauge      stage, camera (1 while the source delivers frames)
consumer_lag_messages                  gauge      stage, topic, partition
identities                             gauge      stage (global identities in the matcher gallery)
reassociations_total                   counter    stage
reassociation_seconds                  histogram  stage (one re-association of the window)
identity_changes_total                 counter    stage, kind (merge|split)
match_threshold                        gauge      stage (the association threshold in force)
=====================================  =========  ==============================================
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

FRAMES = Counter("reidstream_frames", "Frames read from the camera source.", ["stage", "camera"])
DETECTIONS = Counter("reidstream_detections", "Person detections kept after tracking.", ["stage", "camera"])
TRACKLETS = Counter(
    "reidstream_tracklets", "Tracklets closed, by outcome.", ["stage", "camera", "outcome"]
)
EMBEDDINGS = Counter("reidstream_embeddings", "Tracklet embeddings computed.", ["stage", "camera"])
LINKS = Counter(
    "reidstream_links",
    "Tracklets assigned to a global identity (joined an existing one or founded a new one).",
    ["stage", "camera", "kind"],
)
DEAD_LETTERS = Counter(
    "reidstream_dead_letters", "Messages sent to the dead-letter topic.", ["stage", "reason"]
)
REJECTED = Counter(
    "reidstream_rejected_messages", "Poison messages rejected at decode or publish, by cause.", ["stage", "kind"]
)
UNDELIVERED = Counter(
    "reidstream_undelivered", "Messages the broker never acknowledged after every retry.", ["stage", "camera"]
)
SOURCE_INCOMPLETE = Counter(
    "reidstream_source_incomplete",
    "Video files that ended before the frame count their container declared (truncated or corrupt).",
    ["stage", "camera"],
)
RECONNECTS = Counter("reidstream_reconnects", "Source reconnect attempts.", ["stage", "camera"])
DROPPED = Counter("reidstream_dropped", "Items dropped by a bounded queue or policy.", ["stage", "camera", "reason"])
STAGE_LATENCY = Histogram(
    "reidstream_stage_latency_seconds",
    "Processing time per item (frame, tracklet) in a stage, seconds.",
    ["stage", "camera"],
    buckets=_LATENCY_BUCKETS,
)
TRACKLET_LINK_LATENCY = Histogram(
    "reidstream_tracklet_link_latency_seconds",
    "Wall-clock seconds from a tracklet being closed by its camera worker to its link being stored.",
    ["camera"],
    buckets=_E2E_BUCKETS,
)
REID_BATCH_SIZE = Histogram(
    "reidstream_reid_batch_size",
    "Tracklets per re-id forward pass.",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
SOURCE_UP = Gauge("reidstream_source_up", "1 while the camera source delivers frames, else 0.", ["stage", "camera"])
CONSUMER_LAG = Gauge(
    "reidstream_consumer_lag_messages",
    "Messages between the consumer position and the partition high-water mark.",
    ["stage", "topic", "partition"],
)
IDENTITIES = Gauge("reidstream_identities", "Global identities in a zone matcher's gallery.", ["stage", "zone"])
HOT_IDENTITIES = Gauge(
    "reidstream_hot_identities",
    "Identities in a zone matcher's hot tier (seen within index.hot_s, at most index.hot_max; searched exactly "
    "while the gallery's index is the IVF).", ["stage", "zone"],
)
REASSOCIATIONS = Counter("reidstream_reassociations", "Re-associations of the matcher's window.", ["stage"])
REASSOCIATION_SECONDS = Histogram(
    "reidstream_reassociation_seconds", "Wall time of one re-association of the window.", ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
IDENTITY_CHANGES = Counter(
    "reidstream_identity_changes", "Identities merged or split by re-association.", ["stage", "kind"]
)
MATCH_THRESHOLD = Gauge("reidstream_match_threshold", "Association threshold in force in a zone (scoring-space cosine).",
                        ["stage", "zone"])


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` over HTTP in a daemon thread.

    Args:
        port: TCP port; ``0`` disables serving (returns 0).
        host: Address to bind.

    Returns:
        The port served, or 0 when disabled.

    Raises:
        OSError: The port is in use.
    """
    if port == 0:
        return 0
    start_http_server(port, addr=host)
    log.info("metrics served on http://%s:%d/metrics", host, port)
    return port
