"""EuroSAT RGB, 5 tasks x 2 classes, with the PTM pass; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/eurosat.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests (TFDS `eurosat` has no test split).
Target (SPEC 5, A-bar / A_T in %): IN-21K 87.63 +- 2.32 / 79.84 +- 0.32; IN-1K 88.50 +- 2.61 / 80.94 +- 0.30.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import benchmark_config


def get_config(arg=None):
  return benchmark_config("eurosat", arg)
