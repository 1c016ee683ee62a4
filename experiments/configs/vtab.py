"""VTAB-CL composite (5 domains x 10 classes), 5 tasks, with the PTM pass; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/vtab.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests of the 50-class composite.
Target (SPEC 5, A-bar / A_T in %): IN-21K 89.67 +- 1.88 / 85.53 +- 0.81; IN-1K 88.48 +- 2.25 / 83.47 +- 1.90.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import benchmark_config


def get_config(arg=None):
  return benchmark_config("vtab", arg)
