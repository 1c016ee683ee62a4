"""ImageNet-A, 10 tasks x 20 classes; NTK-CL as released (SPEC 2.6).

Command:
  python -m ntkcl_jax.main --config experiments/configs/imagenet_a.py:backbone=in21k,weights_dir=<dir>,data_dir=<dir> --workdir <dir>
(`backbone=in1k` for the ImageNet-1K fine-tuned AugReg file; `seed=0..4`; `mode=corrected`.)
Data layout: `data_dir/{train,test}/<class>/*` or manifests (TFDS `imagenet_a` is test-only).
Target (SPEC 5, A-bar / A_T in %): IN-21K 66.56 +- 1.53 / 58.54 +- 0.91; IN-1K 68.76 +- 0.71 / 60.58 +- 0.56.
Measured: not yet run with this port (needs the AugReg weights and the dataset; README table).
"""

from experiments.configs.common import vitb_config


def get_config(arg=None):
  c = vitb_config(arg)  # ViT-B/16 AugReg backbone; arguments: see `common.vitb_config`
  c.data.name = "imagenet_a"
  c.data.num_classes = 200
  c.data.init_cls = 20
  c.data.increment = 20
  c.train.lr = 0.02
  c.train.batch_size = 16
  c.train.epochs = 20
  c.train.weight_decay = 0.005
  c.model.use_init_ptm = False  # the plain pre-trained ViT pass (PTM section of the features)
  c.loss.lambda_mi = 0.2  # λ_MI, the reference's `nce_temp`
  return c
