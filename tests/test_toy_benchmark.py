"""The toy DreamBench: its scores on hand-made readings, and one real run end to end on a small toy model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from db_adapters.errors import InputError
from db_adapters.pipelines import read_recommendations
from db_adapters.toy import SUBJECTS, render
from db_adapters.toy.benchmark import (
    ATTRIBUTE_COLUMNS,
    CONFIGS,
    PROTOCOL,
    Protocol,
    RunPlan,
    Samples,
    attribute_entropy,
    attribute_rate,
    cached_result,
    entropy_bits,
    identity_rate,
    markdown_table,
    mean_cosine,
    mean_pairwise_distance,
    novel_scenes,
    protocol_for,
    run_one,
    save_result,
    scene_rate,
    score,
    summarize,
    wrong_noun,
)

STAR_BOX = SUBJECTS["star_box"]


def test_identity_rate_needs_every_identity_attribute():
    exact = dict(STAR_BOX.attributes, scene="snow")
    reads = [exact, dict(exact, mark="ring"), dict(exact, color="blue"), dict(exact, scene="grass")]
    assert identity_rate(reads, STAR_BOX) == 0.5  # the scene is not part of the identity
    assert attribute_rate(reads, STAR_BOX, "mark") == 0.75 and attribute_rate(reads, STAR_BOX, "color") == 0.75


def test_scene_rate_and_entropy():
    reads = [{"scene": "snow"}, {"scene": "grass"}, {"scene": "snow"}, {"scene": "beach"}]
    assert scene_rate(reads, ["snow"]) == 0.5
    assert entropy_bits(["a"] * 4) == 0.0
    assert entropy_bits(["a", "b", "c", "d"]) == pytest.approx(2.0)
    same = [dict(STAR_BOX.attributes)] * 3
    assert attribute_entropy(same) == 0.0


def test_cosine_forms_on_known_vectors():
    basis = torch.eye(4)
    assert mean_cosine(basis[:1], basis[:1]) == pytest.approx(1.0)
    assert mean_cosine(basis[:2], basis[2:]) == pytest.approx(0.0)
    assert mean_pairwise_distance(basis) == pytest.approx(1.0)
    assert mean_pairwise_distance(torch.ones(3, 4) / 2) == pytest.approx(0.0)
    with pytest.raises(InputError):
        mean_pairwise_distance(basis[:1])


def test_score_of_the_subjects_own_renders_is_perfect_identity():
    from db_adapters.toy import load_probe

    probe = load_probe()
    refs = STAR_BOX.reference_images(4)
    scenes = novel_scenes(STAR_BOX, 2)
    contexts = {s: [render(9 + i, **STAR_BOX.attributes, scene=s) for i in range(3)] for s in scenes}
    other = [render(40 + i, cls="box", color="blue", pattern="dotted", scene="beach") for i in range(4)]
    result = score(probe, STAR_BOX, refs, Samples(identity=refs, contexts=contexts, class_images=other))
    assert result["identity"] == 1.0
    assert result["fidelity"] == 1.0 and result["overfit"] == 0.0
    assert result["context_identity"] == 1.0
    assert result["pres"] == 0.0  # blue dotted boxes are not the red starred box
    assert result["class_accuracy"] == 1.0
    assert result["probe_dino"] > result["pres_cosine"]


def test_plans_cover_the_issue_ablations_and_reject_unknown_names():
    assert {"lora", "lora-noppl", "noun-wrong", "noun-none", "full", "id-common", "id-sks"} <= set(CONFIGS)
    assert {p.steps for p in (RunPlan.from_config(s, "star_box") for s in CONFIGS)} >= {100, 1000}
    assert RunPlan.from_config("lora-r16", "star_box").strategy_options == {"rank": 16}
    assert wrong_noun("box") != "box"
    with pytest.raises(InputError, match="unknown setting"):
        RunPlan.from_config("nope", "star_box")
    with pytest.raises(InputError, match="unknown subject"):
        RunPlan.from_config("lora", "nope")


def test_adapter_kind_settings_train_about_as_many_parameters_as_lora_rank_4():
    from db_adapters.families import family_of
    from db_adapters.strategies import get_strategy
    from db_adapters.toy import load_base_pipeline

    pipe = load_base_pipeline()

    def trainable(setting: str) -> int:
        plan = RunPlan.from_config(setting, "star_box")
        strategy = get_strategy(plan.strategy)(**plan.strategy_options)
        strategy.apply(pipe, family_of(pipe), train_text_encoder=False)
        count = sum(p.numel() for params in strategy.trainable_parameters(pipe).values() for p in params)
        strategy.remove(pipe)
        return count

    lora = trainable("lora")
    counts = {kind: trainable(kind) for kind in ("dora", "loha", "lokr", "oft")}
    assert {RunPlan.from_config(kind, "star_box").strategy for kind in counts} == set(counts)
    assert all(abs(count - lora) <= 0.15 * lora for count in counts.values()), (lora, counts)


def test_protocol_digest_changes_with_the_protocol():
    assert dataclasses.replace(PROTOCOL, identity_samples=3).digest() != PROTOCOL.digest()
    # v1's 152 cached runs (benchmarks/results/quality_toy) were saved under this digest, before the
    # protocol named its base model: they must stay readable, and a v2 run must never be taken for one.
    assert Protocol(base_model="v1").digest() == "6adb720d2257"
    # v1 recommended one rate for every strategy, so its protocol fixed full's; v2 recommends its own.
    assert Protocol(base_model="v1", full_learning_rate=None).digest() != "6adb720d2257"


def test_the_protocol_names_the_base_model_read_off_its_folder(small_toy_dir, tmp_path):
    import shutil

    from db_adapters.toy.base import architecture_name, base_dir, weights_digest

    # The shipped model's runs (benchmarks/results/quality_toy_v4) were cached under this digest, and
    # v3's (quality_toy_v3) under the other.
    assert (PROTOCOL.base_model, PROTOCOL.digest()) == ("v4", "70201abf581b")
    assert dataclasses.replace(PROTOCOL, base_model="v3").digest() == "3eabadcbbe4f"
    copy = shutil.copytree(base_dir(), tmp_path / "copy")
    assert protocol_for(copy).digest() == PROTOCOL.digest()  # the same weights, wherever they are
    retrained = shutil.copytree(base_dir(), tmp_path / "retrained")
    unet = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-1] + b"\x00")  # other weights, the same architecture
    assert protocol_for(retrained).base_model == f"v3-{weights_digest(retrained)[:8]}"
    assert protocol_for(retrained).digest() != PROTOCOL.digest()  # they never read v4's cached runs
    # A v1-architecture model trained by the recipe keeps v1's protocol settings, under its own name.
    assert architecture_name(small_toy_dir) == "v1" and protocol_for(small_toy_dir).full_learning_rate == 1e-4
    assert protocol_for(small_toy_dir).base_model.startswith("v1-")
    assert protocol_for(small_toy_dir).digest() != "6adb720d2257"
    with pytest.raises(FileNotFoundError, match="not a toy base pipeline folder.*WORK_DIR/pipeline"):
        protocol_for(tmp_path)


def test_one_run_end_to_end_is_cached_and_tabled(small_toy_dir, tmp_path):
    from db_adapters.toy import load_base_pipeline, load_probe

    protocol = Protocol(identity_samples=2, context_scenes=1, context_samples=2, class_samples=2, sample_steps=2)
    pipe = load_base_pipeline(small_toy_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = run_one(RunPlan.from_config("lora", "star_box"), pipe, load_probe(), tmp_path / "cls", protocol)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items()), "pipeline not restored"
    assert set(result["scores"]) >= {"identity", "fidelity", "pres", "div_entropy", "overfit", "identity_mark"}
    assert result["instance_prompt"] == f"a {result['identifier']} box"
    save_result(tmp_path, result, protocol)
    assert cached_result(tmp_path, "lora", "star_box", protocol)["scores"] == result["scores"]
    assert cached_result(tmp_path, "lora", "star_box", PROTOCOL) is None  # another protocol: not reused
    # The run recorded the model's recommendations; once they are edited, it no longer stands for them.
    recommended = read_recommendations(small_toy_dir)
    assert result["recommendations"] == recommended and recommended["steps"] > 0
    assert cached_result(tmp_path, "lora", "star_box", protocol, recommended) is not None
    edited = {**recommended, "steps": recommended["steps"] + 100}
    assert cached_result(tmp_path, "lora", "star_box", protocol, edited) is None
    unrecorded = {k: v for k, v in result.items() if k != "recommendations"}  # cached before runs recorded them
    save_result(tmp_path, unrecorded, protocol)
    assert cached_result(tmp_path, "lora", "star_box", protocol, edited) is not None
    table = markdown_table(summarize([result]))
    assert "| lora | 1 |" in table
    by_attribute = markdown_table(summarize([result]), "all", ATTRIBUTE_COLUMNS)
    assert "identity_mark" in by_attribute and "| lora | 1 |" in by_attribute
    older = {**result, "scores": {k: v for k, v in result["scores"].items() if k not in ATTRIBUTE_COLUMNS}}
    assert "| lora |" not in markdown_table(summarize([older]), "all", ATTRIBUTE_COLUMNS)  # v1's runs lack them
    json.dumps(result)  # the cache is plain JSON
