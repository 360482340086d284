#!/usr/bin/env python
"""Ablation: `run_pretraining.py` with the EsViT / DINO loss multiplied by 0, so that only the
KoLeo term (`--koleo_loss_weight`, 0.5 in the default recipe) trains the student.

    OMP_NUM_THREADS=1 python benchmarks/koleo_only_ablation.py --output_dir /tmp/koleo_only [run_pretraining.py arguments]
"""

import runpy
import sys

import esvit.training.loss as loss_module

original = loss_module.EsViTLoss.forward


def without_view_loss(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    out.loss = out.loss * 0.0
    return out


loss_module.EsViTLoss.forward = without_view_loss
sys.argv = ["run_pretraining.py", *sys.argv[1:]]
runpy.run_path("run_pretraining.py", run_name="__main__")
