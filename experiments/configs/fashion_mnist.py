"""Split Fashion-MNIST (5 tasks x 2 classes) on the shipped tiny ViT; offline if the Debian data exist.

Command:
  python -m ntkcl_jax.main --config experiments/configs/fashion_mnist.py --workdir workdirs/fmnist
Needs `apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist); a
clear error says so otherwise. Caveat: the tiny backbone was pre-trained on these very images
(`experiments/pretrain_tiny.py`), so this benchmark measures continual learning on top of a
backbone that already separates the classes; `demo` (Animal-MNIST) is the honest offline default.
"""

from experiments.configs import demo


def get_config(arg=None):
  c = demo.get_config(arg)
  c.data.name = "fashion_mnist"
  c.data.max_train_per_class = 1000
  return c
