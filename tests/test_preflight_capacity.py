"""`python -m ntkcl_jax.preflight --max-seeds / --max-batch`: the capacity search
(`ntkcl_jax/preflight/capacity.py`) on synthetic predicates, with a stand-in preflight, and once
end to end with deviceless TPU compiles of the tiny config against a shrunken chip HBM."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest

from ntkcl_jax import preflight as pf
from ntkcl_jax.preflight import capacity
from ntkcl_jax.preflight import command as pf_command
from tests import tiny_configs as tc

# libtpu admits one process at a time (a lockfile) unless told otherwise (as tests/test_preflight.py).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu is not installed (pip install "jax[tpu]==0.9.2"): no TPU topology to compile for',
)


def _counting(limit: int):
  calls: list[int] = []

  def fits(v: int) -> bool:
    calls.append(v)
    return v <= limit

  return fits, calls


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 16, 17, 100, 999, 1000])
def test_largest_fitting_finds_the_exact_answer(limit):
  fits, calls = _counting(limit)
  result = capacity.largest_fitting(fits, lambda v: True, 1, 1000)
  assert result.answer == limit
  assert [v for v, _ in result.probes] == calls and len(set(calls)) == len(calls)
  assert len(calls) <= 2 * 10 + 1  # doubling then bisection: O(log range) probes
  if limit < 1000:  # maximal: the next valid value was probed and does not fit
    assert (limit + 1, False) in result.probes
  assert (limit, True) in result.probes


def test_largest_fitting_probes_only_valid_values():
  fits, calls = _counting(50)
  result = capacity.largest_fitting(fits, lambda v: v % 12 == 0, 1, 1000)
  assert result.answer == 48
  assert all(v % 12 == 0 for v in calls)
  assert (48, True) in result.probes and (60, False) in result.probes
  listed = capacity.largest_fitting(fits, [8, 3, 40, 64, 2000, 3], 1, 1000)
  assert listed.answer == 40 and {v for v, _ in listed.probes} <= {3, 8, 40, 64}


def test_largest_fitting_stops_at_the_limit_and_when_nothing_fits():
  fits, calls = _counting(10**9)
  assert capacity.largest_fitting(fits, lambda v: True, 1, 1024).answer == 1024
  assert calls == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
  fits, calls = _counting(10**9)
  assert capacity.largest_fitting(fits, lambda v: True, 1, 100).answer == 100
  assert calls[-1] == 100
  fits, calls = _counting(0)
  none = capacity.largest_fitting(fits, lambda v: v % 4 == 0, 1, 64)
  assert none.answer is None and none.probes == ((4, False),)
  assert capacity.largest_fitting(fits, [], 1, 64) == capacity.Search(None, ())
  with pytest.raises(ValueError, match="lo=0"):
    capacity.largest_fitting(fits, lambda v: True, 0, 8)


def test_valid_values_follow_the_mesh_layout():
  # 8 devices, batches 12 and 16: the seed axis gcd(8, K) leaves a data axis of 8 / gcd that
  # must divide 12 (and 16): gcd >= 2, i.e. even K.
  valid = capacity.seed_count_valid(8, {"train.batch_size": 12, "eval.batch_size": 16})
  assert [k for k in range(1, 13) if valid(k)] == [2, 4, 6, 8, 10, 12]
  by_hand = capacity.seed_count_valid(8, {"train.batch_size": 16}, seed_axis_size=4)
  assert [k for k in range(1, 13) if by_hand(k)] == [4, 8, 12]
  plain = capacity.batch_size_valid(8, 1, stacked=False)
  assert [b for b in range(1, 33) if plain(b)] == [8, 16, 24, 32]
  stacked = capacity.batch_size_valid(8, 2, stacked=True)  # 2x4 mesh
  assert [b for b in range(1, 13) if stacked(b)] == [4, 8, 12]
  assert capacity.seeds_text(3) == "0,1,2"
  c = capacity.with_value(tc.tiny_config(), capacity.SEEDS, 3)
  assert c.seeds == "0,1,2" and tc.tiny_config().seeds == ""
  assert capacity.with_value(tc.tiny_config(), capacity.BATCH, 24).train.batch_size == 24


def _fake_preflight(peak_per_unit: int, hbm: int, takes_steps: bool = True):
  """A stand-in for `preflight.preflight`: peak = value x peak_per_unit; records its calls."""
  calls = []

  def preflight(config, target, functions):
    value = len(config.seeds.split(",")) if config.seeds else config.train.batch_size
    calls.append((value, None if functions is None else tuple(functions)))
    names = ["train_step", "features", "predict"] if takes_steps else ["features", "predict"]
    if functions is not None:
      names = [n for n in names if n in functions]
    peak = value * peak_per_unit
    results = [
      {
        "function": n,
        "compile_s": 1.0,
        "memory_per_device": {"peak_bytes": peak},
        "fits": peak <= hbm,
      }
      for n in names
    ]
    return {"functions": results, "fits": all(r["fits"] for r in results), "mesh": {"data": 4}}

  return preflight, calls


def test_search_probes_the_train_step_then_confirms_every_function():
  target = pf.Target("fake", "v5e:2x2", [object()] * 4, pf.CHIPS["v5e"])
  preflight, calls = _fake_preflight(peak_per_unit=100, hbm=1000)
  seen = []
  report, cap = capacity.search(
    tc.tiny_config(), target, capacity.BATCH, 64, preflight, on_probe=seen.append
  )
  assert seen == cap["probes"]
  assert capacity.format_probe(capacity.BATCH, seen[2]).startswith(
    "probe train.batch_size=16 (mesh {'data': 4}): DOES NOT FIT, peak 1.6 KiB/device"
  )
  assert cap["answer"] == 8 and cap["confirmed_fits"] and report["fits"]  # multiples of 4
  assert [p["value"] for p in cap["probes"]] == [4, 8, 16, 12]
  assert [p["peak_bytes"] for p in cap["probes"]] == [400, 800, 1600, 1200]
  assert calls[:-1] == [(v, ("train_step",)) for v in (4, 8, 16, 12)] and calls[-1] == (8, None)
  assert cap["compile_s_total"] == 4 + 3 and not cap["at_limit"]
  json.dumps(cap)
  text = capacity.format_capacity(cap)
  assert "largest train.batch_size (per seed) that fits: 8" in text
  assert "16 DOES NOT FIT" in text

  # A method with no train step: every function per probe, no separate confirmation.
  preflight, calls = _fake_preflight(peak_per_unit=100, hbm=250, takes_steps=False)
  report, cap = capacity.search(tc.tiny_config(), target, capacity.SEEDS, 8, preflight)
  assert cap["answer"] == 2 and cap["seeds"] == "0,1" and cap["probed_functions"] == "all"
  assert calls == [(1, ("train_step",)), (1, None), (2, None), (4, None), (3, None)]


def test_both_searches_at_once_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    pf_command.main(tc.tiny_config(), "v5litepod-1", None, max_seeds=True, max_batch=True)
  assert e.value.code == 2
  assert "pass one of them" in capsys.readouterr().err


@needs_libtpu
def test_max_batch_end_to_end_against_a_small_hbm(capsys, monkeypatch, tmp_path):
  # One stacked seed of the tiny config at 112 px on one v5e chip, per-seed train batch 2..4.
  # Measured with jax 0.9.2 / libtpu 0.0.37, train step peak per device: 815,104 bytes at batch 2,
  # 987,136 at 3, 1,159,168 at 4 (~172 KB per image). XLA's temp bytes of these tiny programs
  # are 0 at some batch sizes and ~8 MiB at others (batch 1, 8), so the test searches 2..4 only
  # (`valid_for` patched). A 900,000-byte chip: probes 2 (fits), 4, 3 (do not): answer 2. Then the
  # confirmation compiles every function at 2; the eval functions (~3.7 MB) do not fit: exit 1.
  hbm = 900_000
  monkeypatch.setitem(pf.CHIPS, "v5e", dataclasses.replace(pf.CHIPS["v5e"], hbm_bytes=hbm))
  monkeypatch.setattr(capacity, "valid_for", lambda config, what, n: lambda v: v >= 2)
  config = tc.tiny_config(seeds="0", backbone__image_size=112, eval__batch_size=1)
  path = tmp_path / "capacity.json"
  status = pf_command.main(config, "v5litepod-1", str(path), max_batch=True, capacity_limit=4)
  out, err = capsys.readouterr()
  report = json.loads(path.read_text())
  cap = report["capacity"]
  probes = {p["value"]: p for p in cap["probes"]}
  assert list(probes) == [2, 4, 3], probes
  assert all(p["fits"] == (p["peak_bytes"] <= hbm) for p in probes.values()), probes
  assert all(p["functions"] == ["train_step"] for p in probes.values())
  answer = cap["answer"]
  assert answer == 2 and probes[2]["fits"] and not probes[3]["fits"]  # maximal
  assert cap["compile_s_total"] > cap["probe_compile_s"] > 0
  assert "largest train.batch_size (per seed) that fits: 2" in out
  assert report["batch_size"] == 2 and cap["confirmed_fits"] is False
  assert sorted(r["function"] for r in report["functions"]) == ["features", "predict", "train_step"]
  assert status == 1
  assert "at train.batch_size=2 the train step fits but features, predict do not fit" in err
  assert "lower eval.batch_size" in err

  # Not even the smallest value fits: exit 1 naming what to change.
  monkeypatch.setitem(pf.CHIPS, "v5e", dataclasses.replace(pf.CHIPS["v5e"], hbm_bytes=1000))
  status = pf_command.main(config, "v5litepod-1", None, max_batch=True, capacity_limit=4)
  out, err = capsys.readouterr()
  assert status == 1
  assert "error: not even train.batch_size=2 fits" in err and "fewer --config.seeds" in err


def test_ntk_block_search_probes_the_kernel_alone_without_a_confirmation():
  target = pf.Target("fake", "v5e:1x1", [object()], pf.CHIPS["v5e"])
  calls = []

  def preflight(config, target, functions):
    block = config.analysis.batch_size
    calls.append((block, tuple(functions)))
    fits = block * 100 <= 2000
    result = {"function": "ntk_block", "compile_s": 1.0, "fits": fits}
    result["memory_per_device"] = {"peak_bytes": block * 100}
    return {"functions": [result], "fits": fits, "mesh": {"data": 1}}

  report, cap = capacity.search(tc.tiny_config(), target, capacity.NTK_BLOCK, 64, preflight)
  assert cap["answer"] == 20 and cap["confirmed_fits"] and report["fits"]
  assert cap["flag"] == "--max-ntk-block" and cap["confirm_compile_s"] == 0
  assert all(functions == ("ntk_block",) for _, functions in calls)
  assert [v for v, _ in calls] == [p["value"] for p in cap["probes"]]  # no extra compile
  assert "largest NTK probe block (analysis.batch_size) that fits: 20" in capacity.format_capacity(
    cap
  )


@needs_libtpu
def test_ntk_block_is_compiled_with_the_run_when_analysis_is_on():
  # The NTK hook's kernel for two blocks of 4 probes of the tiny model, on one v5e chip, beside
  # the run's functions. XLA's temp bytes of such tiny programs are erratic (0 at some block
  # sizes, ~6-20 MiB at others), so the test checks what the program must hold: both blocks.
  config = tc.tiny_config(analysis__enabled=True, analysis__batch_size=4)
  report = pf.preflight(config, pf.resolve_target("v5litepod-1"))
  by_name = {r["function"]: r for r in report["functions"]}
  assert sorted(by_name) == ["features", "ntk_block", "predict", "train_step"]
  a = config.analysis
  assert report["ntk"] == {"block": 4, "probes": config.train.max_tasks * (a.n_train + a.n_test)}
  ntk = by_name["ntk_block"]
  size = report["image_size"]
  assert ntk["memory_per_device"]["argument_bytes"] >= 2 * 4 * size * size * 3 * 4
  assert ntk["images_per_call"] == 8 and ntk["fits"]
  assert "two blocks of 4 probes" in pf.format_report(report)
