"""Kvasir, 4 tasks x 2 classes, with the PTM pass; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/kvasir.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests.
Target (SPEC 5, A-bar / A_T in %): IN-21K 90.03 +- 0.73 / 82.70 +- 0.55; IN-1K 91.88 +- 1.15 / 84.72 +- 0.40.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import vitb_config


def get_config(arg=None):
  c = vitb_config(arg)  # ViT-B/16 AugReg backbone; arguments: see `common.vitb_config`
  c.data.name = "kvasir"
  c.data.num_classes = 8
  c.data.init_cls = 2
  c.data.increment = 2
  c.train.lr = 0.005
  c.train.batch_size = 96
  c.train.epochs = 5
  c.train.weight_decay = 0.005
  c.model.use_init_ptm = True  # the plain pre-trained ViT pass (PTM section of the features)
  c.loss.lambda_mi = 0.2  # λ_MI, the reference's `nce_temp`
  return c
