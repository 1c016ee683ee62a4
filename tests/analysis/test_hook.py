"""analysis.hook: NTKHook on a tiny NTK-CL model and a fake stream; end-to-end through train.run.

Pins SPEC 7.1 (θ_A = peft/current, gaussian projection, eval mode), 7.3 (probes of all tasks, train
and test rows), 7.4 (ρ ∈ [0, 1], ρ_ii = 1), 7.8 (files, float64, symmetric PSD Θ) and the summary
section; the hook's kernel is compared with a direct `empirical_ntk_fn` on the same probes, and the
native backend with neural-tangents (implementations 1, 2, 3; rtol 1e-4).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis import cl_kernels as ck
from analysis import measure, nt_compat
from analysis.hook import NTKHook, _Session, measure_checkpoint
from analysis.ntk import empirical_ntk_fn, restrict_to_subtree
from analysis.ntk_files import load_points, read_records
from analysis.probes import ProbeSet, build_probes, round_robin
from ntkcl_jax.config import base_config
from ntkcl_jax.data import ArraySource, TaskStream, class_order
from ntkcl_jax.hooks import TaskView
from ntkcl_jax.models.ntkcl import NTKCL, init_params
from tests.fakes import TINY_VIT
from tests.fakes import tiny_spec as _tiny_spec

T, S_T, N_TR, N_TE = 3, 2, 6, 4  # tasks, classes per task, probes per task
N_ROWS = T * (N_TR + N_TE)


def tiny_spec():
  """tests.fakes.tiny_spec with 2 blocks (the minimum): about a third less to compile."""
  return _tiny_spec(vit=dataclasses.replace(TINY_VIT, depth=2))


SUMMARY_KEYS = {
  "points",
  "final_point",
  "inter_intra_ratio",
  "q",
  "mean_inter_ratio",
  "intra_retention",
  "predictor",
  "forgetting",
  "accuracy_correlation",
  "gap_terms",
  "lambda_sweep",
  "sample_size_sweep",
  "measure_s",
  "overhead_s",
}


def fake_stream() -> TaskStream:
  rng = np.random.default_rng(0)
  num_classes = T * S_T

  def source(per_class, name):
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.integers(0, 256, (labels.size, 16, 16, 3), dtype=np.uint8)
    return ArraySource(images, labels, [f"c{i}" for i in range(num_classes)], name=name)

  return TaskStream(
    source(10, "tr"),
    source(6, "te"),
    order=class_order(0, num_classes),
    init_cls=S_T,
    increment=S_T,
    image_size=16,
    resize_size=16,
    num_workers=0,
  )


def hook_config(**analysis):
  c = base_config()
  c.analysis.enabled = True
  c.analysis.n_train, c.analysis.n_test = N_TR, N_TE
  c.analysis.projection_dim = 4
  c.eval.batch_size = 8
  c.train.epochs, c.train.batch_size = 1, 4
  for k, v in analysis.items():
    c.analysis[k] = v
  return c


def make_view(t, params, stream, workdir, spec, R, num_seen=None):
  protos = np.zeros((T * S_T, spec.feature_dim), np.float32)
  seen = (t + 1) * S_T if num_seen is None else num_seen
  protos[:seen] = np.random.default_rng(t + 5).normal(size=(seen, spec.feature_dim))
  return TaskView(
    task=t,
    num_tasks=T,
    params=params,
    prototypes=protos,
    num_seen=seen,
    spec=spec,
    stream=stream,
    workdir=pathlib.Path(workdir),
    accuracy_matrix=R,
    is_writer=True,
    features=lambda p, x: NTKCL(spec).apply({"params": p}, x, train=False)["m"],
  )


def trained_params(params, t):
  """A stand-in for training: task-dependent perturbation of peft/current (incl. `up`)."""
  key = jax.random.key(100 + t)
  leaves, tree = jax.tree.flatten(params["peft"]["current"])
  keys = jax.random.split(key, len(leaves))
  new = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {**params, "peft": {**params["peft"], "current": jax.tree.unflatten(tree, new)}}


@pytest.fixture(scope="module")
def hook_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("hook")
  spec, stream = tiny_spec(), fake_stream()
  params = init_params(spec, jax.random.key(0))
  R = np.full((T, T), np.nan)
  hook = NTKHook(hook_config())
  hook.on_init(make_view(-1, params, stream, workdir, spec, R, num_seen=0))
  rows = [[90.0], [70.0, 85.0], [50.0, 75.0, 80.0]]
  for t in range(T):
    params = trained_params(params, t)
    R[t, : t + 1] = rows[t]
    hook.on_task_end(make_view(t, params, stream, workdir, spec, R.copy()))
  return {
    "workdir": workdir,
    "hook": hook,
    "summary": hook.summary(),
    "params": params,
    "spec": spec,
    "stream": stream,
    "R": R,
  }


def test_files_shapes_and_kernel_properties(hook_run):
  out = hook_run["workdir"] / "analysis"
  names = ["init"] + [f"task_end_{t}" for t in range(T)]
  assert sorted(p.name for p in out.glob("ntk_*.npz")) == sorted(f"ntk_{n}.npz" for n in names)
  for name in names:
    with np.load(out / f"ntk_{name}.npz", allow_pickle=False) as z:
      theta = z["theta"]
      assert theta.dtype == np.float64 and theta.shape == (N_ROWS, N_ROWS)
      np.testing.assert_array_equal(theta, theta.T)
      eig = np.linalg.eigvalsh(theta)
      assert eig.min() >= -1e-6 * eig.max()
      assert z["task_of_row"].tolist() == np.repeat(np.arange(T), N_TR + N_TE).tolist()
      assert z["split_of_row"].tolist() == (["tr"] * N_TR + ["te"] * N_TE) * T
      assert (
        str(z["point"]) == name and str(z["config_hash"]) == hook_run["hook"].settings.config_hash
      )
      for t in range(T):
        lab = z["labels"][z["task_of_row"] == t]
        assert set(lab.tolist()) == {2 * t, 2 * t + 1}
  lines = [json.loads(x) for x in (out / "ntk.jsonl").read_text().splitlines()]
  assert [x["point"] for x in lines] == names
  for rec in lines:
    rho = np.array(rec["rho"], dtype=float)
    assert rho.shape == (T, T)
    np.testing.assert_allclose(np.diag(rho), 1.0, rtol=1e-12)
    assert np.all((rho >= 0) & (rho <= 1 + 1e-12))
    assert rec["measure_s"] > 0 and "frobenius_norm" in rec["dynamics"]
  assert "velocity" not in lines[0]["dynamics"] and lines[1]["dynamics"]["velocity"] > 0
  assert lines[-1]["intra_retention"][-1] == pytest.approx(1.0)
  assert len(lines[-1]["intra_retention"]) == T
  # output drift: task i's stored probe outputs at task_end(i) vs at the last point
  outputs = {}
  for t in range(T):
    with np.load(out / f"ntk_task_end_{t}.npz", allow_pickle=False) as z:
      outputs[t], rows = z["outputs"], z["task_of_row"]
  drift = lines[-1]["output_drift"]
  assert len(drift) == T and drift[-1] == 0.0
  for i in range(T):
    mine = rows == i
    want = np.linalg.norm(outputs[T - 1][mine] - outputs[i][mine]) / np.linalg.norm(
      outputs[i][mine]
    )
    assert drift[i] == pytest.approx(want, rel=1e-12)
  summary_drift = np.array(hook_run["summary"]["ntk"]["output_drift"], dtype=float)
  np.testing.assert_allclose(summary_drift[T - 1], drift)


def test_probe_rows_follow_the_stream(hook_run):
  stream = hook_run["stream"]
  with np.load(hook_run["workdir"] / "analysis" / "ntk_init.npz") as z:
    index, labels, task = z["index"], z["labels"], z["task_of_row"]
  for t in range(T):
    tr = stream.probe_indices(t, "train", N_TR, 0)
    te = stream.probe_indices(t, "test", N_TE, 0)
    rows = np.flatnonzero(task == t)
    assert sorted(index[rows[:N_TR]].tolist()) == sorted(tr.tolist())
    assert index[rows[N_TR:]].tolist() == te.tolist()
    # round-robin train rows: every prefix of 2 is class-balanced
    first = labels[rows[:N_TR]]
    assert all(len(set(first[i : i + 2].tolist())) == 2 for i in range(0, N_TR, 2))


def test_summary_section(hook_run):
  summary = hook_run["summary"]
  assert set(summary) == {"ntk"}
  ntk = summary["ntk"]
  assert SUMMARY_KEYS <= set(ntk)
  assert ntk["points"] == ["init"] + [f"task_end_{t}" for t in range(T)]
  rho = np.asarray(ntk["inter_intra_ratio"])
  assert rho.shape == (T, T) and np.allclose(np.diag(rho), 1)
  pred = ntk["predictor"]
  assert pred["mode"] == "fixed" and pred["kernel_points"] == ["init"]
  assert np.asarray(pred["accuracy"]).shape == (T, T)
  assert {"avg_acc", "last_acc", "forgetting", "bwt"} <= set(pred["metrics"])
  f = ntk["forgetting"]
  np.testing.assert_allclose(f["measured"], [90 - 50, 85 - 75])  # max previous minus final
  assert len(f["predicted"]) == T - 1 and np.all(np.asarray(f["predicted"]) >= 0)
  assert f["correlation_pairs"]["n"] == 3  # pairs (1,0), (2,0), (2,1)
  assert np.isfinite(f["correlation_pairs"]["pearson"])
  assert [e["value"] for e in ntk["lambda_sweep"]] == list(ck.LAMBDA_REL_GRID)
  assert [e["value"] for e in ntk["sample_size_sweep"]] == [N_TR]
  # The fit residual rises with λ (SPEC 7.6).
  fit = [np.mean(e["fit_residual"]) for e in ntk["lambda_sweep"]]
  assert all(a <= b + 1e-12 for a, b in itertools.pairwise(fit))
  assert ntk["overhead_s"] >= sum(ntk["measure_s"].values()) > 0
  json.dumps(summary, default=lambda o: np.asarray(o).tolist())


@pytest.mark.numerics
def test_hook_kernel_equals_direct_empirical_ntk(hook_run):
  """The task_end_2 kernel, recomputed from scratch: restrict_to_subtree + empirical_ntk_fn."""
  spec, params = hook_run["spec"], hook_run["params"]
  settings = hook_run["hook"].settings
  probes = build_probes(hook_run["stream"], T, N_TR, N_TE, 0, 8)
  model = NTKCL(spec)
  s_mat = measure.projection_matrix(settings.seed, settings.projection_dim, spec.feature_dim)

  def f(p, x):
    return model.apply({"params": p}, x, train=False)["m"] @ s_mat.T

  f_sub, sub = restrict_to_subtree(f, params, ["peft/current"])
  assert sum(x.size for x in jax.tree.leaves(sub)) == sum(
    x.size for x in jax.tree.leaves(params["peft"]["current"])
  )
  direct = empirical_ntk_fn(f_sub, vmap_axes=0)(jnp.asarray(probes.images), None, sub)
  hooked = load_points(hook_run["workdir"] / "analysis")["task_end_2"].theta
  np.testing.assert_allclose(hooked, np.asarray(direct, np.float64), rtol=2e-5, atol=1e-7)


def test_projection_matrix_and_exact_chunks():
  s1, s2 = measure.projection_matrix(3, 16, 64), measure.projection_matrix(3, 16, 64)
  np.testing.assert_array_equal(s1, s2)
  assert s1.shape == (16, 64) and abs(s1.var() * 64 - 1) < 0.15
  assert not np.array_equal(s1, measure.projection_matrix(4, 16, 64))
  # "exact" in chunks of 3 rows of the identity = the kernel averaged over all D = 8 outputs.
  rng = np.random.default_rng(0)
  theta = {"w": rng.normal(size=(4, 6)).astype(np.float32), "v": rng.normal(size=(6, 8))}
  theta["v"] = theta["v"].astype(np.float32)
  x = rng.normal(size=(5, 4)).astype(np.float32)

  def f(th, xx, *, projection=None):
    m = jnp.tanh(xx @ th["w"]) @ th["v"]
    return m if projection is None else m @ projection.T

  chunked = measure.KernelMeter(f).gram_projected(theta, x, measure.exact_chunks(8, 3))
  whole = measure.KernelMeter(f).gram(theta, x)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7)
  # and the gaussian estimate is unbiased: averaged over many S it approaches the exact kernel
  big = measure.projection_matrix(0, 4000, 8)
  estimate = measure.KernelMeter(f).gram(theta, x, projection=jnp.asarray(big))
  np.testing.assert_allclose(estimate, whole, rtol=0.1, atol=0.1 * np.abs(whole).max())


def test_resume_reloads_points_from_disk(hook_run, tmp_path):
  stream, spec = hook_run["stream"], hook_run["spec"]
  settings = hook_run["hook"].settings
  probes = build_probes(stream, T, N_TR, N_TE, settings.seed, 8)
  session = _Session(settings, spec, probes, hook_run["workdir"] / "analysis", False)
  session.resume_from_disk()
  assert list(session.points) == ["init"] + [f"task_end_{t}" for t in range(T)]
  assert set(read_records(hook_run["workdir"] / "analysis")) == set(session.points)
  again = session.summary(hook_run["R"])
  np.testing.assert_allclose(
    again["inter_intra_ratio"], hook_run["summary"]["ntk"]["inter_intra_ratio"]
  )


def test_unsupported_settings_raise():
  with pytest.raises(ValueError, match="proxy head"):
    NTKHook(hook_config(output="proxy_logits"))
  with pytest.raises(ValueError, match="proxy head"):
    NTKHook(hook_config(params="all_trainable"))


def test_round_robin_and_from_arrays():
  labels = np.array([4, 4, 4, 5, 5, 5])
  assert labels[round_robin(labels)].tolist() == [4, 5, 4, 5, 4, 5]
  x = np.arange(8, dtype=np.float32)[:, None]
  probes = ProbeSet.from_arrays(
    x,
    [0, 0, 1, 1, 2, 3, 2, 3],
    [0, 0, 0, 0, 1, 1, 1, 1],
    ["te", "tr", "tr", "te"] * 2,
    [(0, 2), (2, 2)],
  )
  assert probes.split_of_row.tolist() == ["tr", "tr", "te", "te"] * 2
  assert probes.labels.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
  assert probes.images[:, 0].tolist() == [1, 2, 0, 3, 6, 5, 4, 7]


NT_SKIP = pytest.mark.skipif(
  not nt_compat.available(), reason="neural-tangents 0.6.5 not installed (pip install --no-deps)"
)


@pytest.mark.slow
@NT_SKIP
def test_neural_tangents_matches_hook_kernel(hook_run):
  """neural-tangents implementation 1 reproduces the hook's (native) task_end_2 Θ, rtol 1e-4."""
  settings = hook_run["hook"].settings
  spec = hook_run["spec"]
  probes = build_probes(hook_run["stream"], T, N_TR, N_TE, settings.seed, 8)
  theta, rest = measure.split_params(hook_run["params"], "peft")
  proj = measure.projection_matrix(settings.seed, settings.projection_dim, spec.feature_dim)
  meter = measure.KernelMeter(
    measure.make_output_fn(spec), implementation=1, backend="neural_tangents"
  )
  got = meter.gram(theta, probes.images, rest=rest, projection=jnp.asarray(proj))
  hooked = load_points(hook_run["workdir"] / "analysis")["task_end_2"].theta
  np.testing.assert_allclose(got, hooked, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
  "backend,impl",
  [
    ("native", 2),
    pytest.param("neural_tangents", 1, marks=NT_SKIP),
    pytest.param("neural_tangents", 2, marks=NT_SKIP),
    pytest.param("neural_tangents", 3, marks=NT_SKIP),
  ],
)
def test_backends_and_implementations_agree_on_ntkcl(backend, impl):
  """Native implementation 1 vs the others, w.r.t. peft/current of a tiny NTK-CL, rtol 1e-4."""
  if (
    backend == "neural_tangents" and impl == 3 and not nt_compat.structured_derivatives_supported()
  ):
    pytest.skip("implementation 3 needs JAX 0.9.x")
  spec = tiny_spec()
  params = trained_params(init_params(spec, jax.random.key(2)), 1)
  theta, rest = measure.split_params(params, "peft")
  x = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  proj = jnp.asarray(measure.projection_matrix(0, 3, spec.feature_dim))
  f = measure.make_output_fn(spec)
  ref = measure.KernelMeter(f).gram(theta, x, rest=rest, projection=proj)
  got = measure.KernelMeter(f, implementation=impl, backend=backend).gram(
    theta, x, rest=rest, projection=proj
  )
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_tripled_kernel_layout(tmp_path):
  """SPEC 7.6 tripled: the m rows of the 3N-row Gram are the plain Θ; sweep over 3n rows."""
  spec, stream = tiny_spec(), fake_stream()
  settings = NTKHook(hook_config(tripled=True)).settings
  probes = build_probes(stream, T, N_TR, N_TE, settings.seed, 8)
  session = _Session(settings, spec, probes, tmp_path, True)
  params = trained_params(init_params(spec, jax.random.key(3)), 0)
  session.measure("init", -1, params, None, 0)
  tripled = session.tripled
  assert tripled.theta.shape == (3 * N_ROWS, 3 * N_ROWS)
  plain = measure.KernelMeter(measure.make_output_fn(spec)).gram_projected(
    *measure.split_params(params, "peft")[:1],
    probes.images,
    session.projections,
    rest=measure.split_params(params, "peft")[1],
  )
  np.testing.assert_allclose(tripled.theta[2::3, 2::3], plain, rtol=2e-5, atol=1e-7)
  assert not np.allclose(tripled.theta[0::3, 0::3], plain)  # c rows differ from m rows
  with np.load(tmp_path / "ntk_init.npz") as z:
    np.testing.assert_allclose(z["theta_tripled"], tripled.theta)
  ntk = session.summary(None)
  entries = ntk["sample_size_sweep_tripled"]
  assert [e["value"] for e in entries] == [N_TR] and entries[0]["rows_per_task"] == 3 * N_TR


def test_split_params_and_output_shapes():
  """peft / peft+fusion selections and the prototype-logit output, by shape only (no compile)."""
  spec = tiny_spec()
  params = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
  theta, rest = measure.split_params(params, "peft+fusion")
  assert set(theta) == {"current", "fusion_value"} and "value" not in rest["fusion"]
  assert "current" not in rest["peft"] and "ema" in rest["peft"]
  merged = measure.merge_params(theta, rest)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  x = jax.ShapeDtypeStruct((5, 16, 16, 3), jnp.float32)
  f = measure.make_output_fn(spec, output="prototype_logits")
  protos = jax.ShapeDtypeStruct((4, spec.feature_dim), jnp.float32)
  out = jax.eval_shape(
    lambda th, xx, r, pr: f(th, xx, rest=r, prototypes=pr), theta, x, rest, protos
  )
  assert out.shape == (5, 4)
  f3 = measure.make_output_fn(spec, tripled=True)
  proj = jax.ShapeDtypeStruct((3, spec.feature_dim), jnp.float32)
  out3 = jax.eval_shape(
    lambda th, xx, r, pr: f3(th, xx, rest=r, projection=pr), theta, x, rest, proj
  )
  assert out3.shape == (5, 3, 3)


def test_prototype_logits_skip_init(tmp_path):
  settings = NTKHook(hook_config(output="prototype_logits")).settings
  probes = build_probes(fake_stream(), T, N_TR, N_TE, settings.seed, 8)
  session = _Session(settings, tiny_spec(), probes, tmp_path, True)
  assert session.measure("init", -1, None, None, 0) is None
  assert not list(tmp_path.iterdir())


def _tiny_train_config(**overrides):
  """The tiny demo config with analysis on (2 tasks, 8 + 4 probes per task)."""
  from tests.tiny_configs import tiny_config

  return tiny_config(
    small=True,
    train__max_tasks=2,
    analysis__enabled=True,
    analysis__n_train=8,
    analysis__n_test=4,
    analysis__projection_dim=4,
    **overrides,
  )


def _tiny_train_run(workdir):
  """train.run with analysis enabled on `_tiny_train_config()`."""
  from ntkcl_jax import train

  config = _tiny_train_config()
  return config, train.run(config, workdir, hooks=[NTKHook(config)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, summary, workdir) of one `_tiny_train_run` (2 steps per task, a checkpoint per step)."""
  workdir = tmp_path_factory.mktemp("trained")
  config, summary = _tiny_train_run(workdir)
  return config, summary, workdir


def test_end_to_end_train_run_fills_summary(trained):
  """Through ntkcl_jax.train.run: the hook's files and summary["ntk"] (measured R from the run)."""
  _, summary, workdir = trained
  ntk = summary["ntk"]
  assert ntk["points"] == ["init", "task_end_0", "task_end_1"]
  assert np.asarray(ntk["inter_intra_ratio"]).shape == (2, 2)
  measured = np.asarray(ntk["forgetting"]["measured"], dtype=float)
  R = np.asarray(summary["accuracy_matrix"], dtype=float)
  np.testing.assert_allclose(measured, [R[0, 0] - R[1, 0]])
  assert 0 < ntk["overhead_s"] < summary["wall_time_s"]
  written = json.loads((workdir / "summary.json").read_text())
  assert written["ntk"]["points"] == ntk["points"]
  assert len((workdir / "analysis" / "ntk.jsonl").read_text().splitlines()) == 3
  with np.load(workdir / "analysis" / "ntk_task_end_1.npz") as z:
    assert z["theta"].shape == (2 * 12, 2 * 12)


def test_mid_task_checkpoint_uses_the_finished_tasks_prototypes(trained, tmp_path):
  """A checkpoint inside task 1 holds task 0's 2 prototypes (num_seen 2)."""
  from tests.tiny_configs import checkpoint_numbers

  config, _, workdir = trained
  mid = checkpoint_numbers(workdir)[-2]  # step 1 of task 1 (the last is task 1's end)
  # prototype_logits needs the seen rows: with num_seen 0 the point would be skipped
  out = measure_checkpoint(
    _tiny_train_config(analysis__output="prototype_logits"), workdir, number=mid, out_dir=tmp_path
  )
  assert out.get("points") == [f"checkpoint_{mid}"]  # before the fix: {} (num_seen 0, skipped)
  assert (tmp_path / f"ntk_checkpoint_{mid}.npz").exists()
  from ntkcl_jax import load_run

  run = load_run(config, workdir, mid)
  assert (run.in_task, run.tasks_done, run.num_seen) == (True, 1, 2)
  assert run.prototypes[:2].any(axis=1).all() and not run.prototypes[2:].any()


def test_rerun_of_a_finished_run_keeps_the_ntk_section(trained):
  """Issue 14, defect 5: rerunning a finished run must not drop summary["ntk"]."""
  config, _, workdir = trained
  from ntkcl_jax import train

  first = json.loads((workdir / "summary.json").read_text())
  again = train.run(config, workdir, hooks=[NTKHook(config)])
  written = json.loads((workdir / "summary.json").read_text())
  assert written["ntk"] == first["ntk"] and again["ntk"] == first["ntk"]
  assert written["accuracy_matrix"] == first["accuracy_matrix"]


@pytest.mark.slow
def test_measure_checkpoint_reproduces_the_hook(tmp_path):
  """Standalone from the orbax checkpoint: the same init and final kernels, the same summary."""
  config, summary = _tiny_train_run(tmp_path)
  again = measure_checkpoint(config, tmp_path)
  assert again["points"] == ["init", "task_end_1"]
  hooked = load_points(tmp_path / "analysis")
  from_ckpt = load_points(tmp_path / "analysis_ckpt")
  for name in ("init", "task_end_1"):
    np.testing.assert_allclose(from_ckpt[name].theta, hooked[name].theta, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(
    again["forgetting"]["measured"], summary["ntk"]["forgetting"]["measured"]
  )


def test_per_task_predictor_and_drop_matrix(hook_run):
  """SPEC 7.5 per_task mode uses the start-of-task points; a missing one falls back to fixed."""
  from analysis.summary import analyze, drop_matrix

  points = load_points(hook_run["workdir"] / "analysis")
  out = analyze(points, hook_run["R"], mode="per_task")
  assert out["predictor"]["mode"] == "per_task"
  assert out["predictor"]["kernel_points"] == ["init", "task_end_0", "task_end_1"]
  fixed = analyze(points, hook_run["R"], mode="fixed")
  assert not np.allclose(
    out["predictor"]["drift_forgetting"], fixed["predictor"]["drift_forgetting"], equal_nan=True
  )
  partial = {k: v for k, v in points.items() if k != "task_end_0"}
  assert analyze(partial, hook_run["R"], mode="per_task")["predictor"]["mode"] == "fixed"
  drops = drop_matrix(hook_run["R"])
  np.testing.assert_allclose(drops[1:, 0], [90 - 70, 90 - 50])
  assert drops[2, 1] == 85 - 75 and np.isnan(drops[0, 0]) and np.isnan(drops[1, 2])
