"""VTAB-CL composite (5 domains x 10 classes), 5 tasks, with the PTM pass; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/vtab.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests of the 50-class composite.
Target (SPEC 5, A-bar / A_T in %): IN-21K 89.67 +- 1.88 / 85.53 +- 0.81; IN-1K 88.48 +- 2.25 / 83.47 +- 1.90.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import vitb_config


def get_config(arg=None):
  c = vitb_config(arg)  # ViT-B/16 AugReg backbone; arguments: see `common.vitb_config`
  c.data.name = "vtab"
  c.data.num_classes = 50
  c.data.init_cls = 10
  c.data.increment = 10
  c.train.lr = 0.03
  c.train.batch_size = 96
  c.train.epochs = 45
  c.train.weight_decay = 0.005
  c.model.use_init_ptm = True  # the plain pre-trained ViT pass (PTM section of the features)
  c.loss.lambda_mi = 0.2  # λ_MI, the reference's `nce_temp`
  return c
