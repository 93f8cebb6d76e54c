"""The memory harness's configs, virtual manifests, table/bar logic and plot writer, on fake measurements."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks.common import markdown_table, write_csv, write_report
from benchmarks.memory import methods as M
from benchmarks.memory import report
from benchmarks.memory.presets import PRESETS

IDLE = 700.0


def _fake(c_peak=1500.0, e_peak=1480.0, d_peak=2400.0, a_per_row=16 * 512 / 2**20):
    """Measurements shaped like worker.py's results: (a) linear in N, (c) flat, 10M (a) OOM."""
    ms = []
    for n in (50_000, 100_000, 1_281_167, 10_000_000):
        if n < 10_000_000:
            ms.append({"method": "a", "N": n, "status": "ok", "peak_rss_steps_mib": 1400 + a_per_row * n,
                       "peak_rss_total_mib": 1500 + a_per_row * n, "step_s_median": 1.0,
                       "head_analytic_bytes": M.head_bytes("a", n, 512)})
        else:
            ms.append({"method": "a", "N": n, "status": "OOM", "error": "RuntimeError: can't allocate memory"})
        ms.append({"method": "c", "N": n, "status": "ok", "peak_rss_steps_mib": c_peak + n * 8 / 2**20,
                   "peak_rss_total_mib": c_peak + 50, "disk_allocated_bytes": 10**9, "store_files": "full",
                   "store_full_bytes": M.store_bytes(n, 512, 1000), "step_s_median": 2.0})
    ms.append({"method": "d", "N": 50_000, "status": "ok", "peak_rss_steps_mib": d_peak})
    ms.append({"method": "e", "N": 50_000, "status": "ok", "peak_rss_steps_mib": e_peak})
    return ms


def test_rows_net_and_ratios():
    rows = report.build_rows(_fake(), IDLE, "cpu")
    assert [r["method"] for r in rows][:4] == ["a"] * 4 and rows[-1]["method"] == "e"
    c50 = next(r for r in rows if r["method"] == "c" and r["N"] == 50_000)
    assert c50["ratio_vs_sdiet"] == pytest.approx(1.0) and c50["net_mib"] == pytest.approx(c50["peak_mib"] - IDLE)
    oom = next(r for r in rows if r["status"] == "OOM")
    assert oom["peak_mib"] is None and "allocate" in oom["note"]
    d = next(r for r in rows if r["method"] == "d")
    assert d["N_str"] == "any" and d["ratio_vs_sdiet"] == pytest.approx(2400 / c50["peak_mib"])


def test_bars_pass_on_good_and_miss_on_bad_measurements():
    bars = report.check_bars(report.build_rows(_fake(), IDLE, "cpu"), IDLE, "cpu", 256)
    verdicts = {b["bar"].split(":")[0].split(" (")[0][:12]: b["pass"] for b in bars if b["pass"] is not None}
    assert all(verdicts.values()), bars
    linear = next(b for b in bars if b["bar"].startswith("(a)"))
    assert "8,192 B/row" in linear["measured"] and "OOM at N = 10M" in linear["measured"]
    # s-DIET growing 10% with N, SimCLR only 1.2×, s-DIET 20% above supervised: three misses
    bad = _fake(c_peak=1500.0, e_peak=1250.0, d_peak=1800.0)
    for m in bad:
        if m["method"] == "c":
            m["peak_rss_steps_mib"] *= 1 + 0.1 * (m["N"] > 50_000)
    bars = {b["bar"][:4]: b["pass"] for b in report.check_bars(report.build_rows(bad, IDLE, "cpu"), IDLE, "cpu", 256)
            if b["pass"] is not None}
    assert bars["(c) "] is False and bars["(d) "] is False


def test_markdown_csv_json_and_plot(tmp_path):
    rows = report.build_rows(_fake(), IDLE, "cpu")
    bars = report.check_bars(rows, IDLE, "cpu", 256, kernels_mib=100.0)
    md = report.markdown(rows, bars, "cpu")
    assert "| (c) s-DIET batch CE, head on disk | 1.28M | ok |" in md and "OOM" in md and "PASS" in md
    assert "numba" in md  # the kernels note row
    report.plot(rows, tmp_path / "m.png", "cpu", "fake", cap_mib=16 * 1024)
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    write_csv(tmp_path / "m.csv", rows)
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert header.startswith("method,label,N,N_str,status,peak_mib")
    path = write_report("m", "Fake", md, {"device": "cpu"}, {"preset": "x"}, rows, out_dir=tmp_path)
    assert path.read_text().startswith("# Fake") and "**Machine.** device: cpu" in path.read_text()
    assert json.loads((tmp_path / "m.json").read_text())["rows"][0]["method"] == "a"
    gpu = [dict(m, cuda_peak_allocated_mib=m.get("peak_rss_steps_mib")) for m in _fake()]
    assert "GPU peak allocated" in report.markdown(report.build_rows(gpu, 0, "cuda"), [], "cuda")


def test_markdown_table_formats_missing_and_large_values():
    t = markdown_table([{"a": "x", "b": None, "c": 123456.7}, {"a": "y", "b": float("nan"), "c": 0.12345}],
                       ["a", "b", "c"])
    assert t.splitlines()[2] == "| x | — | 123457 |" and t.splitlines()[3] == "| y | — | 0.1235 |"


def test_every_method_config_validates_and_gpu_preset_is_the_papers():
    from diet_engine.engine.config import RunConfig

    for method in M.OVERRIDES:
        cfg = RunConfig.from_dict(M.run_config(PRESETS["cpu-resnet18"], method, "/m", "/r"))
        cfg.validate()
        assert cfg.train.max_steps == 3 and cfg.model.projector == "" and cfg.train.batch_size == 256
    assert RunConfig.from_dict(M.run_config(PRESETS["cpu-resnet18"], "a", "/m", "/r")).head.loss == "full"
    assert RunConfig.from_dict(M.run_config(PRESETS["cpu-resnet18"], "c", "/m", "/r")).head.store == "disk"
    g = PRESETS["gpu-resnet50"]
    assert (g.backbone, g.image_size, g.batch_size, g.precision, g.device) == ("resnet50", 224, 256, "bf16", "cuda")
    with pytest.raises(ValueError, match="unknown method"):
        M.run_config(g, "z", "/m", "/r")


def test_head_and_store_bytes():
    assert M.head_bytes("a", 1000, 512) == 4 * 1000 * 512 * 4
    assert M.head_bytes("c", 1000, 512) == 8 * 1000 + 125
    assert M.head_bytes("e", 10**9, 512) == 0
    assert M.store_bytes(10_000_000, 512, 1000) == pytest.approx(61.6e9, rel=0.01)  # 10M rows, d = 512: 61.6 GB


def test_virtual_manifest_gives_n_positional_samples(tmp_path):
    """N samples backed by one small shard: the loader yields indices across all of 0..N-1."""
    import numpy as np

    from benchmarks.memory.harness import prepare_base, virtual_manifest
    from diet_engine.storage.shards import Manifest, ShardLoader

    preset = SimpleNamespace(base_image_px=4, shard_size=10)
    base = prepare_base(preset, tmp_path)
    path = virtual_manifest(base, 95, tmp_path / "v")
    m = Manifest.load(path)
    assert m.num_samples == 95 and m.num_shards == 10 and m.shards[-1].num_samples == 5
    loader = ShardLoader(m, 16, None, seed=0, with_labels=True)
    seen = []
    for x, idx, _y in loader.epoch(0):
        assert x.shape[1:] == (3, 4, 4)
        seen.append(idx.numpy())
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(95))
