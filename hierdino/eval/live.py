"""Evaluation during training (``eval.every_steps``): the live teacher on the external sets' probe splits.

Every rank runs the teacher forward on the same images (an FSDP2 forward is collective); rank 0
fits the configured probe and reports ``ext_val_bacc``, the mean balanced accuracy over the
external sets, which the sweeps (#6) optimise and ASHA compares.
"""

from __future__ import annotations

import numpy as np
import torch

from hierdino.data import shards
from hierdino.data.suite import eval_set_uris
from hierdino.eval import OBJECTIVE
from hierdino.eval.decode import decode_images
from hierdino.eval.features import backbone_features, eval_center_crop
from hierdino.eval.metrics import pooled_bacc_interval
from hierdino.eval.probes import fit_predict


class LiveEvaluator:
    def __init__(self, cfg, options=None):
        self.probe, self.split = cfg.eval.probe, cfg.eval.split
        self.size = cfg.eval.image_size or cfg.data.image_size
        self.center = eval_center_crop(cfg)
        self.batch_size = cfg.eval.batch_size
        self.bootstrap = min(cfg.eval.bootstrap, 300)  # a few hundred resamples suffice for a 95% interval
        self.sets = []
        for uri in eval_set_uris(cfg):
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            table = shards.read_table(uri, columns=["image", "image_id", "label", "split"], options=options)
            labels = np.array(table["label"].to_pylist(), dtype=object)
            splits = np.array(table["split"].to_pylist(), dtype=object)
            keep = (labels != None) & np.isin(splits, self._splits_needed())  # noqa: E711 - elementwise
            images = decode_images([b for b, k in zip(table["image"].to_pylist(), keep) if k], self.size,
                                   [i for i, k in zip(table["image_id"].to_pylist(), keep) if k], self.center)
            self.sets.append((name, images, labels[keep], splits[keep]))

    def _splits_needed(self) -> list[str]:
        """train (probe fit), the scored split, and val where ``logreg`` chooses C on it (not when val is scored)."""
        return ["train", self.split] + (["val"] if self.probe == "logreg" and self.split != "val" else [])

    @torch.no_grad()
    def __call__(self, backbone, device) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        out, scored = {}, []
        for name, images, labels, splits in self.sets:
            feats = backbone_features(backbone, images, self.size, self.batch_size, device)
            tr, ev, val = splits == "train", splits == self.split, splits == "val"
            x_val, y_val = (feats[val], labels[val]) if self.split != "val" else (None, None)  # val scored: C by train CV
            pred = fit_predict(self.probe, feats[tr], labels[tr], feats[ev], x_val=x_val, y_val=y_val)
            scored.append((list(labels[ev]), list(pred)))
            out[f"bacc/{name}"] = pooled_bacc_interval([scored[-1]], n=0)[0]
        backbone.train(was_training)
        # the objective of sweeps, with its bootstrap interval pooled over the datasets
        out[OBJECTIVE], out[f"{OBJECTIVE}_lo"], out[f"{OBJECTIVE}_hi"] = pooled_bacc_interval(scored, n=self.bootstrap)
        return out
