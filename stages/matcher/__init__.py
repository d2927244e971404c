"""Cross-camera matching: global identities from tracklet embeddings (the ``matcher`` stage).

* :mod:`stages.matcher.association`: cannot-links, scoring space, constrained average linkage,
  transit times, :func:`~stages.matcher.association.associate` for one window.
* :mod:`stages.matcher.calibration`: the label-free threshold (``reidstream calibrate``).
* :mod:`stages.matcher.matcher`: the stage (:class:`CrossCameraMatcher`, :func:`run_matcher`).
* :mod:`stages.matcher.offline`: the same rules over a fixed set of tracklets (calibration, adaptation).
* :mod:`stages.matcher.evaluation`: links scored against a ground truth (``reidstream evaluate-links``).

See docs/IDENTITIES.md.
"""

from stages.matcher.matcher import CrossCameraMatcher, Decision, run_matcher

__all__ = ["CrossCameraMatcher", "Decision", "run_matcher"]
