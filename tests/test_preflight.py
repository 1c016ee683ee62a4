"""`ntkcl_jax.preflight`: the run's functions compiled for a TPU slice without one (libtpu's
topology descriptions), and the same program the trainer runs (the CPU target)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from ntkcl_jax import preflight as pf
from ntkcl_jax import train
from ntkcl_jax.preflight import command as pf_command
from tests import tiny_configs as tc
from tests.preflight_checks import check_run_report

# libtpu admits one process at a time (a lockfile) unless told otherwise; these tests only
# compile, so another process (a second pytest, a preflight run) may hold it meanwhile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu is not installed (pip install "jax[tpu]==0.9.2"): no TPU topology to compile for',
)


@needs_libtpu
@pytest.mark.parametrize("seeds", ["", "0,1"])
def test_tiny_run_compiles_and_reports_for_a_tpu_slice(seeds):
  report = pf.preflight(tc.tiny_config(seeds=seeds), pf.resolve_target("v5litepod-4"))
  assert report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
  assert report["mesh"] == ({"seed": 2, "data": 2} if seeds else {"data": 4})
  train_step = check_run_report(report, seeds)
  assert train_step["bytes_accessed_per_device"] > 0
  assert "all-reduce" in train_step["collectives"]  # gradients summed over "data"
  bound = train_step["roofline_bound"]["images_per_s_upper_bound"]
  assert bound > 0 and train_step["margin_bytes"] > 0
  text = pf.format_report(report)
  assert "not measurements" in text and "upper bound" in text
  json.dumps(report)  # the --json file


@needs_libtpu
def test_compiled_train_flops_match_the_analytic_count():
  # At the tiny test width (16) LayerNorm, softmax, GELU and the optimiser are ~30 % of the
  # compiled FLOPs (the analytic count is matmuls only; measured ratio 1.42). At width 256 the
  # matmuls dominate: measured ratio 1.047 (1.03 at 384, 1.01-1.02 at ViT-B/16).
  config = tc.tiny_config(
    backbone__width=256,
    backbone__mlp_dim=1024,
    backbone__num_heads=1,
    model__fusion_heads=1,
  )
  report = pf.preflight(config, pf.resolve_target("v5litepod-1"), functions=["train_step"])
  (r,) = report["functions"]
  ratio = r["flops_per_image"] / r["analytic_matmul_flops_per_image"]
  assert 1.0 <= ratio <= 1.05, ratio


@needs_libtpu
def test_a_function_over_the_chips_hbm_exits_1_naming_it(capsys, monkeypatch):
  # The verdict and exit status against a chip of 4 MiB HBM (the tiny train step needs ~9 MiB
  # per device): fast. The real oversize case (XLA refuses to compile) is the slow test below.
  monkeypatch.setitem(pf.CHIPS, "v5e", dataclasses.replace(pf.CHIPS["v5e"], hbm_bytes=4 * 2**20))
  status = pf_command.main(tc.tiny_config(), "v5litepod-1", None, functions=["train_step"])
  out, err = capsys.readouterr()
  assert status == 1
  assert "DOES NOT FIT" in out
  assert "error: train_step does not fit in the 4.0 MiB HBM of a TPU v5e chip" in err


@needs_libtpu
@pytest.mark.slow
def test_a_run_that_cannot_fit_exits_1_naming_the_function(capsys):
  # 2**21 eval images of 28x28x3 float32 are 18.4 GiB per call: more than a v5e chip's 16 GiB;
  # XLA:TPU refuses to compile it (CompileTimeHbmOom). About a minute of compilation.
  config = tc.tiny_config(eval__batch_size=2**21)
  status = pf_command.main(config, "v5litepod-1", None, functions=["features"])
  out, err = capsys.readouterr()
  assert status == 1
  assert "DOES NOT FIT" in out and "CompileTimeHbmOom" in out
  assert "error: features does not fit in the 16,384.0 MiB HBM of a TPU v5e chip" in err


@needs_libtpu
def test_l_mi_gathers_the_batch_once_on_a_data_mesh():
  # L_MI joins the batch's features with replicated prototype rows. `sharding.gather_batch`
  # gathers features, labels and mask once; left to XLA, the step on this mesh had 3 all-to-alls,
  # 9 collective-permutes, 1 all-gather and 9 all-reduces.
  report = pf.preflight(tc.tiny_config(), pf.resolve_target("v5litepod-4"), ["train_step"])
  coll = report["functions"][0]["collectives"]
  assert "all-to-all" not in coll and "collective-permute" not in coll, coll
  assert coll["all-gather"]["count"] == 1 and coll["all-reduce"]["count"] <= 4, coll


@needs_libtpu
def test_multi_slice_meshes_build_and_stacked_seeds_stay_within_their_slice():
  target = pf.resolve_target("v5litepod-4", slices=2)
  assert target.name == "v5litepod-4 x 2 slices" and len(target.devices) == 8
  stacked = pf.preflight(tc.tiny_config(seeds="0,1"), target, ["train_step"])
  assert stacked["mesh"] == {"seed": 2, "data": 4}
  _, _, stack, _ = pf.build(tc.tiny_config(seeds="0,1"), target.devices)
  assert [{d.slice_index for d in row} for row in stack.mesh.devices] == [{0}, {1}]
  coll = stacked["functions"][0]["collectives"]
  assert not [k for k in coll if k.startswith("dcn-")], coll  # seeds never talk across slices
  plain = pf.preflight(tc.tiny_config(), target, ["train_step"])
  coll = plain["functions"][0]["collectives"]
  assert coll["dcn-all-reduce"]["count"] > 0 and coll["all-reduce"]["count"] > 0, coll


def test_unknown_function_and_bad_slices_are_named():
  with pytest.raises(ValueError, match="--functions: unknown train; valid: train_step"):
    pf.preflight(tc.tiny_config(), pf.resolve_target("cpu"), ["train"])
  with pytest.raises(pf.UnknownTargetError, match="--slices=0 must be >= 1"):
    pf.resolve_target("v5litepod-4", slices=0)
  with pytest.raises(pf.UnknownTargetError, match="TPU targets only"):
    pf.resolve_target("cpu", slices=2)


def test_dcn_transfers_are_counted_apart_from_in_slice_collectives():
  # Two lines of a multi-slice TPU program (libtpu 0.0.37): an in-slice all-reduce and a
  # transfer across slices tagged by the megascale runtime.
  hlo = "\n".join(
    [
      "  %all-reduce.1 = f32[32,32]{1,0:T(8,128)} all-reduce(%p), channel_id=1, "
      "replica_groups={{0,1,2,3}}, to_apply=%add",
      "  %send.3 = (f32[1,1,128]{2,1,0:T(1,128)}, u32[], token[]) send(%all-reduce.43, "
      "%after-all.3), channel_id=39, is_host_transfer=true, frontend_attributes={_xla_host_"
      'transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",'
      '_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}',
    ]
  )
  assert pf.collectives(hlo) == {
    "all-reduce": {"count": 1, "bytes": 4096},
    "dcn-all-reduce": {"count": 1, "bytes": 512},
  }


def test_unknown_target_lists_the_valid_ones():
  proc = subprocess.run(
    [sys.executable, "-m", "ntkcl_jax.preflight", f"--config={tc.DEMO_CONFIG}", "--target=v9-8"],
    capture_output=True,
    text=True,
    env=tc.subprocess_env(1),
    timeout=120,
  )
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  assert "unknown --target 'v9-8'" in errors[0]
  for name in ("v4-8", "v5litepod-1", "v5litepod-16", "v5p-8", "cpu", "v5e:2x2"):
    assert name in errors[0]


def _describe(x):
  """What a jitted function's argument fixes of its program: shape, dtype, weak type, sharding
  (a Python scalar: its type)."""
  if not hasattr(x, "shape"):
    return type(x).__name__
  return (x.shape, x.dtype, x.weak_type, x.sharding)


class _Recorder:
  """The trainer's train step, recording its first call's lowering and input shardings."""

  def __init__(self, fn):
    self.fn, self.text, self.args = fn, None, None

  def __call__(self, *args):
    if self.text is None:
      self.text = self.fn.lower(*args).as_text()
      self.args = jax.tree_util.tree_map(_describe, args)
    return self.fn(*args)


@pytest.mark.parametrize("seeds", ["", "0,1"])
def test_preflight_lowers_the_trainers_programs(monkeypatch, tmp_path, seeds):
  """The one code path: what `train.run` jits on the 8 CPU devices of this session and what
  preflight lowers for those devices (target "cpu") are the same programs (train step, predict)
  with the same input shardings, for a plain and a stacked-seed run."""
  recorders = []

  def build_programs(*args, **kwargs):
    programs = pf_build_programs(*args, **kwargs)
    recorders.append({"train_step": _Recorder(programs.train_step)})
    recorders[-1]["predict"] = _Recorder(programs.predict)
    return dataclasses.replace(programs, **recorders[-1])

  from ntkcl_jax import steps

  pf_build_programs = steps.build_programs
  monkeypatch.setattr(train, "build_programs", build_programs)
  config = tc.tiny_config(train__max_tasks=1, seeds=seeds)
  train.run(config, tmp_path / "run")
  (trainer,) = recorders

  target = pf.resolve_target("cpu")
  assert list(target.devices) == jax.devices() and len(target.devices) == 8
  plan, method, stack, programs = pf.build(config, target.devices)
  assert stack.stacked == bool(seeds)
  all_args = pf.abstract_args(plan, method, stack, programs)
  for name in ("train_step", "predict"):
    args, recorded = all_args[name], trainer[name]
    assert getattr(programs, name).lower(*args).as_text() == recorded.text, name
    ours = jax.tree_util.tree_map(_describe, args)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(recorded.args)
    for got, want in zip(
      jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(recorded.args), strict=True
    ):
      assert got == want, name
