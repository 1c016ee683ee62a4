"""Kvasir, 4 tasks x 2 classes, with the PTM pass; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/kvasir.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests.
Target (SPEC 5, A-bar / A_T in %): IN-21K 90.03 +- 0.73 / 82.70 +- 0.55; IN-1K 91.88 +- 1.15 / 84.72 +- 0.40.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import benchmark_config


def get_config(arg=None):
  return benchmark_config("kvasir", arg)
