"""PlantVillage (15-class subset), 5 tasks x 3 classes, with the PTM pass; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/plantvillage.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests of the 15-class subset.
Target (SPEC 5, A-bar / A_T in %): IN-21K 88.00 +- 2.37 / 81.88 +- 0.25; IN-1K 87.26 +- 2.16 / 80.81 +- 0.22.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import vitb_config


def get_config(arg=None):
  c = vitb_config(arg)  # ViT-B/16 AugReg backbone; arguments: see `common.vitb_config`
  c.data.name = "plantvillage"
  c.data.num_classes = 15
  c.data.init_cls = 3
  c.data.increment = 3
  c.train.lr = 0.005
  c.train.batch_size = 96
  c.train.epochs = 5
  c.train.weight_decay = 0.005
  c.model.use_init_ptm = True  # the plain pre-trained ViT pass (PTM section of the features)
  c.loss.lambda_mi = 0.2  # λ_MI, the reference's `nce_temp`
  return c
