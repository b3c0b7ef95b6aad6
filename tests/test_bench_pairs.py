"""The benchmark's back-to-back pairs: each pair's ratio is taken within the pair, the headline is
their median (bench/run.py, bench/report.py; no trainer runs here), and bench/child.py's memory phases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import training_table
from bench.run import Bench, Row, build_parser, make_plan

MODEL = "SD1.5-shaped (random)"


def _bench(tmp_path, repeat: int) -> Bench:
    args = build_parser().parse_args(["--output", str(tmp_path), "--repeat", str(repeat), "--device", "cpu"])
    return Bench(args, make_plan(False, "cpu", 1, ["sd15"]))


def _row(who: str, s_per_step: float, rss: float, pair: int, section: str = "train") -> Row:
    return Row(section, MODEL, who, 256, 5, s_per_step=s_per_step, wall_s=60.0, peak_rss_mib=rss,
               training_peak_rss_mib=rss, steps=13, warmup=3, pair=pair)


def test_the_headline_is_the_median_of_the_pairs_each_against_its_own_reference(tmp_path):
    bench = _bench(tmp_path, 3)
    # A machine that slows down over the run: pair 2's reference is slow, and so is its "ours".
    bench.rows = [_row("reference", 10.0, 1000, 1), _row("ours", 5.0, 800, 1),
                  _row("reference", 20.0, 1000, 2), _row("ours", 16.0, 700, 2),
                  _row("reference", 12.0, 1000, 3), _row("ours", 8.0, 750, 3),
                  _row("ours, no gradient checkpointing", 6.0, 900, 1, section="train-extra")]
    speedup, memory, pick = bench.headline()
    assert pick == MODEL
    assert speedup == pytest.approx(1.5)  # median of 2.0, 1.25, 1.5
    assert memory == pytest.approx(0.75)  # median of 0.8, 0.7, 0.75

    table = training_table([r.__dict__ for r in bench.rows])
    lines = {line.split("  256")[0].strip(): line for line in table.splitlines()[2:]}
    assert "x1.25" in lines[f"{MODEL}  ours (pair 2)"]  # against pair 2's reference, not pair 1's (x0.62)
    assert "x2.00" in lines[f"{MODEL}  ours (pair 1)"]
    # the extra row, run after the pairs, against the last reference (12 s / 6 s)
    assert "x2.00" in lines[f"{MODEL}  ours, no gradient checkpointing"]


def test_a_pair_that_did_not_finish_is_left_out_and_one_pair_is_the_old_single_run(tmp_path):
    bench = _bench(tmp_path, 2)
    bench.rows = [_row("reference", 10.0, 1000, 1), _row("ours", 4.0, 800, 1), _row("reference", 9.0, 1000, 2)]
    speedup, memory, _ = bench.headline()
    assert (speedup, memory) == (pytest.approx(2.5), pytest.approx(0.8))
    table = training_table([r.__dict__ for r in bench.rows])
    assert "(pair 1)" in table and "(pair 2)" in table


def test_repeat_must_be_positive():
    from bench.run import main

    with pytest.raises(SystemExit, match="--repeat 0"):
        main(["--repeat", "0", "--device", "cpu"])


def _comfy(host, model, case, who, s, rss, params=100, matched=True, pair=1):
    return {"host": host, "model": model, "case": case, "who": who, "matched": matched, "s_per_step": s,
            "peak_rss_mib": rss, "training_peak_rss_mib": rss, "trainable_params": params, "flops_per_step": 2e9,
            "peak_gflops": 10.0, "share_of_peak": 2e9 / s / 10e9, "note": "", "detail": {}, "pair": pair}


def test_the_comfy_section_compares_each_case_within_its_host_and_model():
    from bench.comfy_rows import ratios
    from bench.report import comfy_table
    from bench.run import comfy_headline

    rows = [_comfy("0.33", "sd15", "matched", "host", 1.5, 3000), _comfy("0.33", "sd15", "matched", "ours", 1.0, 2400),
            _comfy("0.3.64", "sd15", "matched", "host", 1.0, 2000),
            _comfy("0.3.64", "sd15", "matched", "ours", 2.0, 2000),
            _comfy("0.33", "sd15", "host offloading", "host", 4.0, 1000, matched=False)]
    r = ratios(rows)
    assert r[("0.33", "sd15", "matched")] == pytest.approx((1.5, 0.8))
    assert r[("0.3.64", "sd15", "matched")] == pytest.approx((0.5, 1.0))
    assert ("0.33", "sd15", "host offloading") not in r  # no equivalent on our side: no ratio
    line = comfy_headline(rows)
    assert "0.33 sd15: x1.50 at 0.80" in line and "0.3.64 sd15: x0.50 at 1.00" in line
    table = comfy_table(rows)
    assert "x1.50" in table and "20.0%" in table and "(not matched)" in table  # 2 GFLOP / 1 s / 10 GFLOP/s


def test_the_comfy_section_pairs_each_ours_with_its_own_host_run_and_takes_the_median():
    from bench.comfy_rows import ratios
    from bench.report import comfy_table
    from bench.run import comfy_headline

    # The machine slows down in pair 2: both trainers are slower there, the ratio within the pair holds.
    rows = [_comfy("0.33", "sd15", "matched", "host", 1.0, 3000, pair=1),
            _comfy("0.33", "sd15", "matched", "ours", 0.5, 2400, pair=1),
            _comfy("0.33", "sd15", "matched", "host", 2.0, 3000, pair=2),
            _comfy("0.33", "sd15", "matched", "ours", 1.6, 2700, pair=2),
            _comfy("0.33", "sd15", "matched", "host", 1.2, 3000, pair=3),
            _comfy("0.33", "sd15", "matched", "ours", 0.8, 2100, pair=3)]
    assert ratios(rows)[("0.33", "sd15", "matched")] == pytest.approx((1.5, 0.8))  # medians of 2, 1.25, 1.5 / .8 .9 .7
    line = comfy_headline(rows)
    assert "0.33 sd15: x1.50 at 0.80 (median of x2.00 at 0.80, x1.25 at 0.90, x1.50 at 0.70)" in line
    table = comfy_table(rows)
    pair2 = next(l for l in table.splitlines() if "(pair 2)" in l and "ours" in l)
    assert "x1.25" in pair2  # against pair 2's host run (2.0 s), not pair 1's (x0.62)


def test_the_comfy_pairs_alternate_which_trainer_runs_first(tmp_path, monkeypatch):
    """Pair 1 runs the host first, pair 2 ours first, and so on (an order effect cancels in the median);
    each pair's rows still list the host's run first, and every run is compared with its own pair's."""
    from bench import comfy_rows

    monkeypatch.setattr(comfy_rows, "measure_peak", lambda *a: {"gflops": 10.0})
    host = comfy_rows.ComfyHost("0.33", tmp_path, tmp_path / "python")
    monkeypatch.setattr(comfy_rows.ComfyHost, "missing", lambda self: None)
    ran = []

    class Result:
        record = {"flops_per_step": 1e9}

        def __init__(self, s):
            self.s = s

        def summary(self, warmup):
            return {"s_per_step": self.s, "peak_rss_mib": 1000.0, "training_peak_rss_mib": 900.0}

    def child(tag, wrapper, target, steps, python, env):
        who = target[target.index("--which") + 1]
        ran.append(who)
        info = Path(target[target.index("--info") + 1])
        info.write_text(json.dumps({"trainable_params": 42}))
        # the second run of a pair is 10 % slower (a warming machine): ABBA cancels it in the median
        second = len(ran) % 2 == 0
        return Result((2.0 if who == "host" else 1.0) * (1.1 if second else 1.0))

    rows = comfy_rows.run_comfy_section(hosts=[host], models=["sd15"], quick=True, warmup=1, measure=2,
                                        resolution=64, rank=4, lr=1e-4, images=2, threads=1, env={}, work=tmp_path,
                                        child=child, log=lambda *_: None, notes=[], repeat=4)
    assert ran == ["host", "ours", "ours", "host"] * 2
    assert [(m.pair, m.who) for m in rows] == [(p, w) for p in (1, 2, 3, 4) for w in ("host", "ours")]
    speed, _ = comfy_rows.ratios([m.__dict__ for m in rows])[("0.33", "sd15", "matched")]
    assert speed == pytest.approx((2.0 / 1.1 + 2.2 / 1.0) / 2)  # median of 1.82, 2.2, 1.82, 2.2: the true 2.0 ± 10 %


def test_the_comfy_headline_shows_the_memory_after_the_shared_model_load():
    from bench.report import comfy_table
    from bench.run import comfy_headline

    rows = [_comfy("0.33", "sd15", "matched", "host", 1.5, 3000), _comfy("0.33", "sd15", "matched", "ours", 1.0, 2400)]
    rows[0]["after_load_peak_rss_mib"], rows[1]["after_load_peak_rss_mib"] = 3000.0, 1950.0
    assert "0.33 sd15: x1.50 at 0.80, 0.65 after the load" in comfy_headline(rows)
    ours = next(line for line in comfy_table(rows).splitlines() if "ours (Train node)" in line)
    assert "1950 (0.65)" in ours


def test_a_program_marks_its_model_loaded_and_the_trainers_peak_is_told_from_the_loaders(tmp_path):
    """bench.child runs a program that holds 600 MB while 'loading', frees it, calls model_loaded(),
    then trains with far less: the process's peak is the load's, the peak after the load is the
    training's own."""
    import subprocess
    import sys as _sys

    from bench.proc import REPO, ChildResult

    prog = tmp_path / "prog.py"
    prog.write_text(
        "import torch\n"
        "from bench import child\n"
        "big = torch.ones(150_000_000)  # 600 MB, the loader's transient\n"
        "del big\n"
        "child.model_loaded()\n"
        "w = torch.nn.Parameter(torch.ones(1000))\n"
        "opt = torch.optim.SGD([w], lr=0.1)\n"
        "for _ in range(3):\n"
        "    (w * torch.ones(2_000_000)[:1000]).sum().backward()\n"
        "    opt.step()\n")
    record = tmp_path / "rec.json"
    proc = subprocess.run([_sys.executable, "-m", "bench.child", "--record", str(record), "--steps", "3",
                           "--script", str(prog), "--"], cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(record.read_text())
    if not rec.get("hwm_reset"):
        pytest.skip("this kernel does not let a process reset its VmHWM (/proc/self/clear_refs)")
    result = ChildResult("prog", 1.0, 0, 0, [], rec, tmp_path / "log", rec["start"])
    assert list(rec["rss_phases_kib"])[0] == "load"
    peak, after = result.peak_rss_kib(), result.after_load_peak_rss_kib()
    assert peak == rec["rss_phases_kib"]["load"]
    assert peak - after > 450_000, (peak, after)  # the 600 MB were the load's, not the trainer's
    assert result.summary()["after_load_peak_rss_mib"] == pytest.approx(after / 1024, abs=0.1)
