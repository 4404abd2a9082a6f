"""benchmarks/toy_sweep.py: the combinations it plans, and the pick it makes from cached runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from db_adapters.toy.benchmark import save_result

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_sweep.py"


def load_script():
    spec = importlib.util.spec_from_file_location("toy_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plans_cover_every_combination_on_the_easy_subjects_only(tmp_path):
    sweep = load_script()
    args = sweep.parse_args(["--steps", "300", "600", "--learning-rates", "1e-3", "--ranks", "4", "8"])
    plans = sweep.plans(args)
    assert {p.setting for p in plans} == {"lora-s300-lr0.001-r4", "lora-s300-lr0.001-r8", "lora-s600-lr0.001-r4",
                                          "lora-s600-lr0.001-r8"}  # fmt: skip
    assert {p.subject for p in plans} == {"star_box", "ring_ball", "cross_tent", "ring_cup"}
    assert {(p.steps, p.learning_rate, p.strategy_options["rank"]) for p in plans} >= {(600, 1e-3, 8)}
    full = sweep.plans(sweep.parse_args(["--strategy", "full", "--learning-rates", "5e-5", "--steps", "300"]))
    assert {p.setting for p in full} == {"full-s300-lr5e-05"} and full[0].strategy_options == {}
    assert all(p.train_text_encoder is False for p in plans + full)  # stated, not left to the model
    with_encoder = sweep.plans(sweep.parse_args(["--steps", "400", "--train-text-encoder"]))
    assert {p.setting for p in with_encoder} == {"lora-s400-lr0.001-r4-te"}
    assert all(p.train_text_encoder is True for p in with_encoder)


def fake(sweep, results_dir: Path, plans, identity: float, fidelity: float, pres: float) -> None:
    from dataclasses import asdict

    for plan in plans:
        scores = {"identity": identity, "fidelity": fidelity, "pres": pres}
        save_result(
            results_dir, {"setting": plan.setting, "subject": plan.subject, "plan": asdict(plan), "scores": scores}
        )


def test_the_pick_is_the_cheapest_combination_that_passes_on_every_easy_subject(tmp_path):
    sweep = load_script()
    args = sweep.parse_args(["--results-dir", str(tmp_path), "--report"])
    cheap = sweep.plans(sweep.parse_args(["--steps", "300", "--ranks", "4"]))
    costly = sweep.plans(sweep.parse_args(["--steps", "600", "--ranks", "8"]))
    leaky = sweep.plans(sweep.parse_args(["--steps", "200", "--ranks", "4"]))
    fake(sweep, tmp_path, costly, identity=0.9, fidelity=0.85, pres=0.02)
    fake(sweep, tmp_path, leaky, identity=0.95, fidelity=0.9, pres=0.2)  # forgets the class: fails on PRES
    fake(sweep, tmp_path, cheap[:3], identity=0.9, fidelity=0.9, pres=0.0)  # one subject missing: no pick
    assert "Pick: lora-s600-lr0.001-r8." in sweep.report(args)
    fake(sweep, tmp_path, cheap[3:], identity=0.9, fidelity=0.9, pres=0.0)
    assert "Pick: lora-s300-lr0.001-r4." in sweep.report(args)


def test_among_equally_cheap_passes_the_pick_clears_the_bar_by_the_most(tmp_path):
    sweep = load_script()
    args = full_args(sweep, tmp_path)
    for rate, identity, fidelity in (("5e-5", 0.85, 0.99), ("7e-5", 0.92, 0.84), ("1e-4", 0.99, 0.81)):
        plans = sweep.plans(sweep.parse_args(["--strategy", "full", "--steps", "400", "--learning-rates", rate]))
        fake(sweep, tmp_path, plans, identity=identity, fidelity=fidelity, pres=0.0)
    # Slack over the bar: 5e-5 0.05 (identity and PRES), 7e-5 0.04 (fidelity), 1e-4 0.01 (fidelity).
    assert "Pick: full-s400-lr5e-05." in sweep.report(args)
    assert sweep.margin({"identity": 0.85, "fidelity": 0.99, "pres": 0.01}) == pytest.approx(0.04)


def test_without_a_pass_the_report_names_the_nearest_complete_combination(tmp_path):
    sweep = load_script()
    args = sweep.parse_args(["--results-dir", str(tmp_path), "--report"])
    scene_bound = sweep.plans(sweep.parse_args(["--steps", "600", "--ranks", "8"]))
    balanced = sweep.plans(sweep.parse_args(["--steps", "400", "--ranks", "4"]))
    partial = sweep.plans(sweep.parse_args(["--steps", "300", "--ranks", "4"]))
    fake(sweep, tmp_path, scene_bound, identity=0.95, fidelity=0.4, pres=0.0)  # short by 0.4
    fake(sweep, tmp_path, balanced, identity=0.78, fidelity=0.79, pres=0.0)  # short by 0.02
    fake(sweep, tmp_path, partial[:2], identity=0.8, fidelity=0.8, pres=0.0)  # passes, but on 2 subjects only
    full = sweep.plans(sweep.parse_args(["--strategy", "full", "--steps", "400", "--learning-rates", "7e-5"]))
    fake(sweep, tmp_path, full, identity=0.9, fidelity=0.9, pres=0.0)  # passes, but is another strategy's
    text = sweep.report(args)
    assert "Pick: none passes yet." in text and "Nearest: lora-s400-lr0.001-r4 (largest shortfall 0.020" in text
    assert "full-s400" not in text and "full-s400-lr7e-05 | 4 |" in sweep.report(full_args(sweep, tmp_path))
    assert sweep.shortfall({"identity": 0.9, "fidelity": 0.9, "pres": 0.08}) == pytest.approx(0.03)


def full_args(sweep, results_dir: Path):
    return sweep.parse_args(["--results-dir", str(results_dir), "--report", "--strategy", "full"])
