"""The training side of re-id: data sets, clip sampling, training, evaluation, mining and adaptation.

The serving path (:mod:`stages.reid.stage`, :mod:`stages.reid.engines`, :mod:`stages.reid.models`,
:mod:`stages.reid.checkpoint`) never imports this package. Modules:

* ``datasets/``: MARS, iLIDS-VID, PRID-2011, DukeMTMC-VideoReID and mined tracklet folders.
* ``sampling``: clip sampling, augmentation, torch data sets, the P x K sampler.
* ``trainer``: the training loop (``reidstream train``).
* ``evaluation``: CMC, mAP, k-reciprocal re-ranking; ``evaluate``: ``reidstream evaluate``.
* ``mine``: camera workers without Kafka writing tracklet folders (``reidstream mine``).
"""
