"""Video re-id data sets: a registry of loaders addressed by ``"name:/path"`` specs.

====================  ==========================================  =====================================
spec name             data set                                    module
====================  ==========================================  =====================================
``mars``              MARS (Zheng et al., ECCV 2016)              :mod:`stages.reid.training.datasets.mars`
``ilidsvid``          iLIDS-VID (Wang et al., ECCV 2014), split   :mod:`stages.reid.training.datasets.ilidsvid`
``prid2011``          PRID-2011 multi-shot (Hirzer et al.), split :mod:`stages.reid.training.datasets.prid2011`
``duke``              DukeMTMC-VideoReID (Wu et al., CVPR 2018)   :mod:`stages.reid.training.datasets.duke`
``tracklets``         folders mined by ``reidstream mine``        :mod:`stages.reid.training.datasets.tracklets`
====================  ==========================================  =====================================

Loaders are imported lazily (scipy is only imported for the ``.mat`` based sets).

Example:
    >>> ds = load_dataset("ilidsvid:/data/ilids-vid", split=2)  # doctest: +SKIP
    >>> ds.num_train_pids, len(ds.query), len(ds.gallery)  # doctest: +SKIP
    (150, 150, 150)
"""

from __future__ import annotations

import importlib
from typing import Any

from stages.reid.training.datasets.base import JUNK_PID, TrackletItem, VideoReidDataset

__all__ = ["DATASETS", "JUNK_PID", "SPLIT_DATASETS", "TrackletItem", "VideoReidDataset", "load_dataset"]

DATASETS: dict[str, str] = {
    "mars": "stages.reid.training.datasets.mars:load_mars",
    "ilidsvid": "stages.reid.training.datasets.ilidsvid:load_ilidsvid",
    "prid2011": "stages.reid.training.datasets.prid2011:load_prid2011",
    "duke": "stages.reid.training.datasets.duke:load_duke",
    "tracklets": "stages.reid.training.datasets.tracklets:load_tracklets",
}
"""Spec name -> ``"module:callable"`` of its loader."""

SPLIT_DATASETS = frozenset({"ilidsvid", "prid2011"})
"""Data sets evaluated over several train/test splits (pass ``split``)."""


def load_dataset(spec: str, split: int | None = None, **kwargs: Any) -> VideoReidDataset:
    """Load a data set from a ``"name:/path"`` spec.

    Args:
        spec: ``"<name>:<path>"`` with ``<name>`` a key of :data:`DATASETS`; the path may itself
            contain ``:`` (only the first one separates).
        split: Split index for iLIDS-VID and PRID-2011 (default 0); must be None for the others.
        **kwargs: Extra keyword arguments of the loader (e.g. ``holdout_fraction``, ``seed`` for
            ``tracklets``; ``seed`` for PRID-2011's generated splits).

    Returns:
        The loaded :class:`VideoReidDataset`.

    Raises:
        ValueError: Malformed spec, unknown name (the message lists the valid ones), or ``split``
            given for a data set without splits.
        FileNotFoundError: The data set layout is missing (raised by the loader).
    """
    name, sep, path = spec.partition(":")
    name = name.strip().lower()
    if not sep or not path:
        raise ValueError(f"dataset spec must look like 'name:/path', got {spec!r}; names: {sorted(DATASETS)}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} in spec {spec!r}; valid names: {sorted(DATASETS)}")
    if split is not None:
        if name not in SPLIT_DATASETS:
            raise ValueError(f"dataset {name!r} has no splits; split must be None (got {split!r})")
        kwargs["split"] = split
    module_name, _, attr = DATASETS[name].partition(":")
    loader = getattr(importlib.import_module(module_name), attr)
    return loader(path, **kwargs)
