"""DomainNet, 15 tasks x 23 classes; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/domainnet.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/domainnet_{train,test}.yaml` (keys `data` = paths, `targets` = ints) with image paths rebased on data_dir.
Target (SPEC 5, A-bar / A_T in %): IN-21K 73.70 +- 0.47 / 67.44 +- 0.36; IN-1K 72.94 +- 0.27 / 66.73 +- 0.21.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import vitb_config


def get_config(arg=None):
  c = vitb_config(arg)  # ViT-B/16 AugReg backbone; arguments: see `common.vitb_config`
  c.data.name = "domainnet"
  c.data.num_classes = 345
  c.data.init_cls = 23
  c.data.increment = 23
  c.train.lr = 0.02
  c.train.batch_size = 96
  c.train.epochs = 50
  c.train.weight_decay = 0.005
  c.model.use_init_ptm = False  # the plain pre-trained ViT pass (PTM section of the features)
  c.loss.lambda_mi = 0.2  # λ_MI, the reference's `nce_temp`
  return c
