"""The evaluation protocol's plumbing on tiny random models: embedders, LPIPS, DreamBench data, `evaluate`, CLI."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from db_adapters.cli import main
from db_adapters.errors import InputError
from db_adapters.evaluation import metrics, protocol
from db_adapters.evaluation.dreambench import dreambench_prompts, dreambench_subjects, format_prompt
from db_adapters.evaluation.embedders import DinoEmbedder, load_embedders, preprocess, tiny_embedders
from db_adapters.evaluation.lpips import LPIPS, TAP_CHANNELS, load_lpips, random_lpips, to_lpips_input

QUICK = {"images_per_prompt": 2, "steps": 2, "max_prompts": 2, "pres_images": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: thread start-up costs more than it saves, and many threads crawl on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedders():
    return tiny_embedders(seed=0)


def photos(count: int = 3, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    colours = ["red", "green", "blue", "yellow"]
    return [Image.new("RGB", size, colours[i % len(colours)]) for i in range(count)]


# --- DINO and CLIP embedders -------------------------------------------------------------------


def test_dino_embedding_is_the_cls_token_after_the_final_layernorm_never_the_pooler():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    model = ViTModel(config, add_pooling_layer=True).eval()  # a pooler exists here, and must be ignored
    final_norm = {}
    model.layernorm.register_forward_hook(lambda module, inputs, output: final_norm.setdefault("out", output))
    dino = DinoEmbedder(model, "test-vit")
    image = photos(1)

    embedding = dino.embed(image)

    with torch.no_grad():
        outputs = model(pixel_values=dino.pixel_values(image))
    torch.testing.assert_close(embedding, outputs.last_hidden_state[:, 0])
    torch.testing.assert_close(embedding, final_norm["out"][:, 0])
    assert not torch.allclose(embedding, outputs.pooler_output, atol=1e-3)


def test_tiny_dino_has_no_pooler_and_still_embeds(embedders):
    assert embedders.dino.model.pooler is None
    assert embedders.dino.embed(photos(2)).shape == (2, 32)


def test_crop_size_follows_the_model_config():
    from transformers import ViTConfig

    real_sized = DinoEmbedder(SimpleNamespace(config=ViTConfig()), "vit-224")
    assert (real_sized.resize_size, real_sized.crop_size) == (256, 224)  # torch.hub DINO: 256 then 224
    tiny = tiny_embedders().dino
    assert (tiny.resize_size, tiny.crop_size) == (37, 32)
    assert tiny.pixel_values(photos(1, (80, 40))).shape == (1, 3, 32, 32)


def test_preprocess_resizes_the_shorter_side_crops_the_centre_and_normalises():
    image = Image.new("RGB", (80, 40), "white")
    image.paste((0, 0, 0), (0, 0, 20, 40))  # a black band at the left edge, outside the centre crop
    # 80x40 -> shorter side 32 -> 64x32 -> centre 32x32 = original columns 16..64: all white
    batch = preprocess([image], resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert batch.shape == (1, 3, 32, 32)
    # white: (1.0 - 0.5) / 0.25 = 2.0
    assert batch[0, :, :, 8:24].mean().item() == pytest.approx(2.0, abs=1e-3)


def test_clip_embeds_images_and_texts_into_one_space(embedders):
    images = embedders.clip.embed_images(photos(3))
    texts = embedders.clip.embed_texts(["a dog in the snow", "a red dog"])
    assert images.shape == (3, 16) and texts.shape == (2, 16)
    assert torch.isfinite(images).all() and torch.isfinite(texts).all()


def test_missing_real_models_name_the_model_and_how_to_get_it(tmp_path):
    with pytest.raises(InputError, match="facebook/dino-vits16") as caught:
        load_embedders(cache_dir=tmp_path)
    assert "huggingface-cli download facebook/dino-vits16" in str(caught.value)


# --- LPIPS ------------------------------------------------------------------------------------


def test_lpips_is_zero_for_identical_images_symmetric_and_positive_otherwise():
    net = random_lpips(seed=0)
    a, b = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    assert net(a, a).tolist() == [0.0, 0.0]
    torch.testing.assert_close(net(a, b), net(b, a))
    assert (net(a, b) > 0).all()


def test_lpips_pairwise_matrix_matches_pairwise_forward_calls():
    net = random_lpips(seed=1)
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    matrix = net.pairwise(images)
    assert matrix[0, 2].item() == pytest.approx(net(images[:1], images[2:]).item(), rel=1e-5)
    assert torch.equal(matrix, matrix.T) and torch.equal(matrix.diagonal(), torch.zeros(3, dtype=torch.float64))


def test_lpips_trunk_is_alexnet_features_with_five_heads():
    net = LPIPS()
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in net.features if hasattr(m, "weight")
    ]
    assert convs == [(3, 64, 11, 4), (64, 192, 5, 1), (192, 384, 3, 1), (384, 256, 3, 1), (256, 256, 3, 1)]
    assert [head.in_channels for head in net.heads] == list(TAP_CHANNELS)
    assert all(head.bias is None for head in net.heads)
    assert "torchvision" not in sys.modules


def _lpips_repo_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # lpips keeps torchvision's indices inside its slices: slice1 = 0-1, slice2 = 2-4, slice3 = 5-7, ...
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    renamed = {}
    for key, tensor in state.items():
        kind, index, name = key.split(".")
        renamed[
            f"net.slice{slice_of[int(index)]}.{index}.{name}" if kind == "features" else f"lin{index}.model.1.{name}"
        ] = tensor
    renamed["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    return renamed


@pytest.mark.parametrize("names", ["ours", "lpips repo"])
def test_load_lpips_reads_our_key_names_and_the_original_ones(tmp_path, names):
    from safetensors.torch import save_file

    source = random_lpips(seed=3)
    state = source.state_dict()
    path = tmp_path / "lpips.safetensors"
    save_file(state if names == "ours" else _lpips_repo_names(state), str(path))
    loaded = load_lpips(path)
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    torch.testing.assert_close(loaded(images[:1], images[1:]), source(images[:1], images[1:]))


def test_load_lpips_refuses_incomplete_or_negative_weights(tmp_path):
    from safetensors.torch import save_file

    state = random_lpips(seed=0).state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("heads.4")}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InputError, match="heads.4.weight"):
        load_lpips(tmp_path / "partial.safetensors")
    save_file({**state, "heads.0.weight": -state["heads.0.weight"]}, str(tmp_path / "negative.safetensors"))
    with pytest.raises(InputError, match="non-negative"):
        load_lpips(tmp_path / "negative.safetensors")
    with pytest.raises(InputError, match="not found"):
        load_lpips(tmp_path / "absent.safetensors")


def test_lpips_input_is_minus_one_to_one():
    batch = to_lpips_input([Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")])
    assert batch.shape == (2, 3, 8, 8) and batch.min().item() == -1.0 and batch.max().item() == 1.0


# --- DreamBench data --------------------------------------------------------------------------


def test_dreambench_lists_have_25_prompts_sharing_1_to_10_and_21_to_25():
    objects, live = dreambench_prompts(live=False), dreambench_prompts(live=True)
    assert len(objects) == len(live) == 25
    assert objects[:10] == live[:10] and objects[20:] == live[20:]
    assert not set(objects[10:20]) & set(live[10:20])
    assert all("{0}" in p and "{1}" in p for p in objects + live)
    assert objects[12] == "a {0} {1} with the Eiffel Tower in the background"
    assert live[13] == "a {0} {1} wearing a black top hat and a monocle"
    assert objects[24] == "a cube shaped {0} {1}"


def test_dreambench_subjects_are_the_30_with_their_class_nouns():
    subjects = dreambench_subjects()
    assert len(subjects) == 30 and "dog4" not in subjects
    assert {s.folder for s in subjects.values() if s.live} == {"cat", "cat2"} | {f"dog{n}" for n in "235678"} | {"dog"}
    assert subjects["bear_plushie"].class_noun == "stuffed animal"
    assert subjects["pink_sunglasses"].class_noun == "glasses"


def test_clip_prompts_drop_the_identifier():
    assert format_prompt("a {0} {1} in the jungle", "olg", "dog") == "a olg dog in the jungle"
    assert format_prompt("a {0} {1} in the jungle", None, "dog") == "a dog in the jungle"
    assert format_prompt("a red {0} {1}", "", "stuffed animal") == "a red stuffed animal"


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_renders_with_the_identifier_and_scores_clip_t_without_it(monkeypatch, embedders):
    rendered, scored = [], []

    def fake_render(pipe, prompt, count, sampling):
        rendered.append(prompt)
        return photos(count, (32, 32))

    embed_texts = embedders.clip.embed_texts
    monkeypatch.setattr(protocol, "_render", fake_render)
    monkeypatch.setattr(embedders.clip, "embed_texts", lambda texts: scored.extend(texts) or embed_texts(texts))
    adapter = SimpleNamespace(identifier="olg", class_noun="dog")
    pipe = SimpleNamespace(config={})

    report = protocol.evaluate(pipe, adapter, photos(2), None, live=True, embedders=embedders, **QUICK)

    assert rendered == ["a olg dog in the jungle", "a olg dog wearing a black top hat and a monocle", "a dog"]
    assert scored == ["a dog in the jungle", "a dog wearing a black top hat and a monocle"]
    assert list(report.clip_t_per_prompt) == scored
    # CLIP-T is the matched-pair mean: image i against its own prompt's embedding only.
    flat = [image for row in report.images for image in row]
    matched = metrics.matched_cosine(embedders.clip.embed_images(flat), embed_texts(scored).repeat_interleave(2, dim=0))
    assert report.clip_t == pytest.approx(matched)
    assert report.settings["identifier"] == "olg" and report.settings["class_noun"] == "dog"


def test_evaluate_on_the_tiny_pipeline_gives_finite_metrics_and_records_the_models(tmp_path, embedders):
    from db_adapters.testing import tiny_pipeline

    report = protocol.evaluate(tiny_pipeline(), None, photos(3), "dog", live=False, embedders=embedders, **QUICK)

    assert all(isinstance(v, float) and v == v and abs(v) < 1e6 for v in report.metrics().values())
    assert report.models["dino"] == "tiny-random-vit"
    assert report.models["clip"] == "tiny-random-clip"
    assert report.models["lpips"] == "tiny-random-lpips"
    assert set(report.preprocessing) == {"dino", "clip", "lpips"}
    assert report.prompts == ["a dog in the jungle", "a dog floating on top of water"]
    assert report.settings["images_per_prompt"] == 2 and report.settings["steps"] == 2

    json_path, png_path = report.save(tmp_path / "eval" / "report.json", tmp_path / "eval" / "sheet.png")
    saved = json.loads(json_path.read_text())
    assert saved["dino"] == pytest.approx(report.dino) and saved["models"]["clip"] == "tiny-random-clip"
    assert "images" not in saved
    with Image.open(png_path) as sheet:
        assert sheet.size == (2 * 32, 3 * 32)  # 2 prompts + the class-prompt row, 2 images each


def test_evaluate_without_lpips_reports_div_as_none(monkeypatch, embedders):
    monkeypatch.setattr(protocol, "_render", lambda pipe, prompt, count, sampling: photos(count, (32, 32)))
    without_lpips = SimpleNamespace(**{**vars(embedders), "lpips": None})
    without_lpips.model_ids, without_lpips.preprocessing = embedders.model_ids, embedders.preprocessing
    report = protocol.evaluate(
        SimpleNamespace(config={}), None, photos(2), "cat", live=True, embedders=without_lpips, **QUICK
    )
    assert report.div is None and json.loads(json.dumps(report.to_dict()))["div"] is None


def test_evaluate_refuses_bad_counts(embedders):
    with pytest.raises(InputError, match="images_per_prompt"):
        protocol.evaluate(None, None, photos(1), "dog", live=True, embedders=embedders, images_per_prompt=0)


# --- db-adapt eval ---------------------------------------------------------------------------------


def test_cli_eval_with_tiny_embedders_writes_report_and_sheet(tmp_path, tiny_dir, subject_dir):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_dir), "--images", str(subject_dir), "--class-noun", "dog", "--live"]
    args += ["--embedder", "tiny", "--max-prompts", "2", "--images-per-prompt", "2", "--steps", "2"]
    args += ["--pres-images", "2", "--device", "cpu", "--output", str(out)]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"dino", "clip_i", "clip_t", "pres", "div", "clip_t_per_prompt", "models", "settings"}
    assert report["models"]["pipeline"] == str(tiny_dir) and report["models"]["adapter"] is None
    assert (out / "sheet.png").is_file()
    assert "dino" in result.output


def test_cli_eval_with_a_missing_real_model_exits_2_naming_it(tmp_path, subject_dir):
    missing = "db-adapters-tests/no-such-dino"
    args = ["eval", "--model", "unused", "--images", str(subject_dir), "--class-noun", "dog"]
    args += ["--dino-model", missing, "--output", str(tmp_path / "eval")]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 2, result.output
    assert missing in result.output and "huggingface-cli download" in result.output
    assert len(result.output.strip().splitlines()) == 1
