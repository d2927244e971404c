"""Cross-camera matching: global identities from tracklet embeddings (the ``matcher`` stage).

* :mod:`stages.matcher.matcher`: the stage (:class:`CrossCameraMatcher`, :func:`run_matcher`).
"""

from stages.matcher.matcher import CrossCameraMatcher, Decision, run_matcher

__all__ = ["CrossCameraMatcher", "Decision", "run_matcher"]
