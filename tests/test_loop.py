"""The accelerator-ready loop (issue 12): prefetch order, device-side lr / key / non-finite check,
matmul precision in the lowered program, backend check. No training run here (tests/test_cli.py
pins resume and the NaN stop end to end; tests/test_train.py 1 vs 8 devices)."""

from __future__ import annotations

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import config as config_lib
from ntkcl_jax import losses, sharding, train, workdir
from ntkcl_jax.data.prefetch import prefetch
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.optim import epoch_cosine_schedule, make_optimizer
from ntkcl_jax.train_step import (
  Health,
  TaskSchedule,
  TrainState,
  bad_term_names,
  checked_terms,
  make_loop_step,
  make_train_step,
  with_matmul_precision,
)
from tests.test_train_step import BATCH, _setup

# ------------------------------------------------------------------------------------------------
# Prefetch.


def test_prefetch_keeps_order_and_runs_ahead_in_a_thread():
  built = []

  def batches():
    for i in range(7):
      built.append((i, threading.current_thread().name))
      yield i

  it = prefetch(batches(), lambda b: b * 10, size=2)
  first = next(it)
  time.sleep(0.3)  # the thread fills the queue while the consumer "computes"
  assert first == 0 and len(built) >= 3  # 1 consumed + 2 queued (+ 1 being offered)
  assert len(built) <= 4  # bounded
  assert [first, *it] == [0, 10, 20, 30, 40, 50, 60]
  assert {name for _, name in built} == {"ntkcl-prefetch"}


def test_prefetch_reraises_at_the_failing_batch_and_close_stops_the_thread():
  def failing():
    yield 1
    raise OSError("disk gone")

  it = prefetch(failing(), None, size=3)
  assert next(it) == 1
  with pytest.raises(OSError, match="disk gone"):
    next(it)

  closed = threading.Event()

  def endless():
    try:
      i = 0
      while True:
        yield i
        i += 1
    finally:
      closed.set()

  it = prefetch(endless(), None, size=2)
  assert next(it) == 0
  it.close()  # what the trainer's `contextlib.closing` does when a step raises
  assert closed.wait(5)  # the source generator's own cleanup ran
  with pytest.raises(ValueError, match="prefetch size"):
    prefetch([], None, size=0)


# ------------------------------------------------------------------------------------------------
# The loop step: lr and key from the step counter, running non-finite check.


def _fake_step(nan_at: int, term: str = "ce_c"):
  """A step that records its (key, lr) and makes `term` NaN at task step `nan_at`."""

  def step_fn(state, frozen, aux, batch, key, lr):
    bad = state.step == nan_at
    terms = {
      "ce_c": jnp.float32(1.0),
      "total": jnp.float32(2.0),
      "mi": jnp.float32(0.5),
      "key": jax.random.key_data(key),
    }
    terms[term] = jnp.where(bad, jnp.nan, terms[term])
    return TrainState(params=state.params, opt_state=(), step=state.step + 1), terms

  return step_fn


def _run_loop(step_fn, n_steps, check_aux=False, lr0=0.3, epochs=3, steps_per_epoch=2):
  task_key = jax.random.key(42)
  schedule = TaskSchedule.make(task_key, lr0, epochs, steps_per_epoch)
  loop = jax.jit(make_loop_step(step_fn, check_aux))
  state = TrainState(params={"w": jnp.zeros(2)}, opt_state=(), step=jnp.int32(0))
  health, seen = Health.fresh(), []
  for _ in range(n_steps):
    state, health, terms = loop(state, health, None, None, None, schedule)
    seen.append(jax.device_get(terms))
  return jax.device_get(health), seen, task_key


def test_loop_step_lr_and_key_come_from_the_step_counter():
  health, seen, task_key = _run_loop(_fake_step(nan_at=-1), 6)
  host_lr = epoch_cosine_schedule(0.3, 3, 2)
  assert [float(t["lr"]) for t in seen] == [float(host_lr(s)) for s in range(6)]
  for s, t in enumerate(seen):
    want = jax.random.key_data(jax.random.fold_in(task_key, s + 1))
    np.testing.assert_array_equal(t["key"], want)
  assert bool(health.ok) and int(health.bad_step) == -1 and int(health.bad_terms) == 0


def test_loop_step_records_the_first_bad_step_and_terms():
  health, seen, _ = _run_loop(_fake_step(nan_at=3), 6)
  assert not bool(health.ok) and int(health.bad_step) == 3  # stays at the first bad step
  assert bad_term_names(seen[0], int(health.bad_terms)) == ["ce_c"]
  # L_MI is watched only under nonfinite_aux="mask_or_raise" (quirk Q7)
  health, _, _ = _run_loop(_fake_step(nan_at=2, term="mi"), 4)
  assert bool(health.ok)
  health, seen, _ = _run_loop(_fake_step(nan_at=2, term="mi"), 4, check_aux=True)
  assert int(health.bad_step) == 2 and bad_term_names(seen[0], int(health.bad_terms)) == ["mi"]
  assert checked_terms(["total", "mi", "ce_p", "grad_norm", "reg"], False) == ["ce_p", "total"]


# ------------------------------------------------------------------------------------------------
# Matmul precision reaches the compiled program.


@pytest.mark.parametrize("precision", ["default", "high", "highest"])
def test_matmul_precision_is_in_the_lowered_train_step(precision):
  spec, _, trainable, frozen, aux, batch = _setup(False)
  tx = make_optimizer(5e-4)
  step = make_loop_step(make_train_step(NTKCL(spec), losses.LossWeights(), tx, BATCH), False)
  state = TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0))
  schedule = TaskSchedule.make(jax.random.key(0), 0.1, 1, 1)
  text = (
    jax.jit(with_matmul_precision(step, precision))
    .lower(state, Health.fresh(), frozen, aux, batch, schedule)
    .as_text()
  )
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) > 20  # forward and backward of every block
  want = {"default": "DEFAULT", "high": "HIGH", "highest": "HIGHEST"}[precision]
  assert all(f"precision = [{want}, {want}]" in line for line in dots), dots[0]


def test_matmul_precision_key_defaults_and_binds_like_old_workdirs():
  c = config_lib.base_config()
  assert c.model.matmul_precision == "highest" and c.train.platform == "any"
  assert workdir.SCHEMA_ADDITIONS["model.matmul_precision"] == "highest"
  assert "train.platform" in workdir.OUTPUT_ONLY_KEYS
  c.model.matmul_precision = "bf16"
  with pytest.raises(ValueError, match=r"model.matmul_precision='bf16'; valid"):
    config_lib.validate(c)


def test_backend_info_and_platform_check():
  info = sharding.backend_info("any")
  assert info["backend"] == jax.default_backend() == "cpu"
  assert info["device_count"] == jax.device_count() and info["process_count"] == 1
  assert sharding.backend_info("cpu")["device_kind"] == info["device_kind"]
  with pytest.raises(
    ValueError, match=r"train.platform='tpu' but JAX's backend is 'cpu'.*\.\[tpu\]"
  ):
    sharding.backend_info("tpu")
  with pytest.raises(ValueError, match=r"pip install -e \"\.\[cuda12\]\""):
    sharding.backend_info("gpu")


@pytest.mark.numerics
def test_precision_settings_compute_the_same_on_cpu():
  """Why `SCHEMA_ADDITIONS` may say "highest": on CPU every setting gives the same float32."""
  x = jax.random.normal(jax.random.key(0), (32, 200))
  w = jax.random.normal(jax.random.key(1), (200, 50))
  f = lambda a, b: jnp.tanh(a @ b) @ b.T  # noqa: E731
  outs = [np.asarray(jax.jit(with_matmul_precision(f, p))(x, w)) for p in ("default", "highest")]
  np.testing.assert_array_equal(outs[0], outs[1])


def test_old_workdirs_resume_and_new_output_keys_never_bind(tmp_path):
  from tests import tiny_configs as tc

  config = tc.tiny_config()
  train.check_workdir_config(tmp_path, config, write=True)
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # the workdir now holds a run
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  for key in ("model.matmul_precision", "train.platform", "train.prefetch_batches"):
    del old[key]  # as written before issue 12
  path.write_text(json.dumps(old))
  train.check_workdir_config(tmp_path, config, write=True)  # defaults reproduce the old runs
  config.train.platform, config.train.prefetch_batches = "cpu", 5
  train.check_workdir_config(tmp_path, config, write=True)  # output-only
  config.model.matmul_precision = "default"
  with pytest.raises(
    train.WorkdirMismatchError, match=r"model\.matmul_precision: None -> 'default'"
  ):
    train.check_workdir_config(tmp_path, config, write=True)
