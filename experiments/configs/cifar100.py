"""CIFAR-100, 10 tasks x 10 classes; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/cifar100.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: TFDS `cifar100` (prepared with `tfds build cifar100 --file_format=array_record` in data_dir; identical data and ids to the reference).
Target (SPEC 5, A-bar / A_T in %): IN-21K 93.76 +- 0.35 / 90.27 +- 0.20; IN-1K 93.16 +- 0.46 / 89.43 +- 0.34.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import vitb_config


def get_config(arg=None):
  c = vitb_config(arg)  # ViT-B/16 AugReg backbone; arguments: see `common.vitb_config`
  c.data.name = "cifar100"
  c.data.num_classes = 100
  c.data.init_cls = 10
  c.data.increment = 10
  c.train.lr = 0.025
  c.train.batch_size = 16
  c.train.epochs = 20
  c.train.weight_decay = 0.0005
  c.model.use_init_ptm = False  # the plain pre-trained ViT pass (PTM section of the features)
  c.loss.lambda_mi = 0.03  # λ_MI, the reference's `nce_temp`
  return c
