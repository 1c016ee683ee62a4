"""ImageNet-A, 10 tasks x 20 classes; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/imagenet_a.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests (TFDS `imagenet_a` is test-only).
Target (SPEC 5, A-bar / A_T in %): IN-21K 66.56 +- 1.53 / 58.54 +- 0.91; IN-1K 68.76 +- 0.71 / 60.58 +- 0.56.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import benchmark_config


def get_config(arg=None):
  return benchmark_config("imagenet_a", arg)
