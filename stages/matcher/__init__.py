"""Cross-camera matching: global identities from tracklet embeddings (the ``matcher`` stage).

* :mod:`stages.matcher.association`: cannot-links, scoring space, constrained average linkage,
  transit times, :func:`~stages.matcher.association.associate` for one window.
* :mod:`stages.matcher.calibration`: the label-free threshold (``reidstream calibrate``).
* :mod:`stages.matcher.matcher`: one zone's matcher (:class:`CrossCameraMatcher`) and :func:`run_matcher`.
* :mod:`stages.matcher.zones`: the stage, :class:`~stages.matcher.zones.ZonedMatcher`: one matcher per
  zone this instance owns; several instances share the ``embeddings`` topic in one consumer group.
* :mod:`stages.matcher.offline`: the same rules over a fixed set of tracklets (calibration, adaptation).
* :mod:`stages.matcher.evaluation`: links scored against a ground truth (``reidstream evaluate-links``).

See docs/IDENTITIES.md.
"""

from stages.matcher.matcher import CrossCameraMatcher, Decision, run_matcher

__all__ = ["CrossCameraMatcher", "Decision", "run_matcher"]
