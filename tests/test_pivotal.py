"""Pivotal tuning: new tokens whose embeddings train with the adapter, saved in it, loadable by diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_subject_images
from safetensors.torch import load_file

from db_adapters import AdapterError, InputError, load_adapter, personalize, unload_adapter
from db_adapters.adapter import embeddings_path
from db_adapters.families import family_of
from db_adapters.pivotal import TokenEmbeddings, token_encoders, tokenizer_and_encoder
from db_adapters.testing import tiny_pipeline, tiny_pipeline_of

FAMILIES = ["sd", "sdxl", "sd3", "flux"]
QUICK = {"steps": 3, "num_class_images": 2, "class_inference_steps": 2, "progress": False, "learning_rate": 1e-2}


def tables(pipe) -> dict[str, torch.Tensor]:
    family = family_of(pipe)
    return {c: getattr(pipe, c).get_input_embeddings().weight.detach().clone() for c in token_encoders(family)}


def vocab_sizes(pipe) -> dict[str, int]:
    family = family_of(pipe)
    return {c: len(tokenizer_and_encoder(pipe, family, c)[0]) for c in token_encoders(family)}


def render(pipe, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="pt", height=32, width=32).images


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_new_rows_train_and_they_load_back_identically(family, tmp_path):
    pipe = tiny_pipeline_of(family)
    before, sizes = tables(pipe), vocab_sizes(pipe)
    adapter = personalize(pipe, make_subject_images(), "dog", pivotal_tokens=2, **QUICK)
    assert adapter.identifier == "<s0><s1>" and adapter.instance_prompt == "a <s0><s1> dog"
    assert adapter.tokens == ["<s0>", "<s1>"]
    after = tables(pipe)
    initial = TokenEmbeddings(adapter.tokens)
    initial.add(fresh := tiny_pipeline_of(family), family_of(fresh), seed=0)
    for component, table in after.items():
        assert table.shape[0] == before[component].shape[0] + 2
        assert torch.equal(table[:-2], before[component])  # the old vocabulary is untouched
        assert not torch.allclose(table[-2:], initial.rows()[component])  # the new rows trained
    trained = render(pipe, "a <s0><s1> dog on the beach")
    path = adapter.save(tmp_path / "pivotal.safetensors")
    assert embeddings_path(path).exists()

    other = tiny_pipeline_of(family)
    loaded = load_adapter(other, path)
    assert loaded.tokens == adapter.tokens and loaded.identifier == adapter.identifier
    assert torch.allclose(render(other, "a <s0><s1> dog on the beach"), trained, atol=1e-4)
    base = render(tiny_pipeline_of(family), "a dog on the beach")
    unload_adapter(other)
    assert vocab_sizes(other) == sizes and all(torch.equal(t, before[c]) for c, t in tables(other).items())
    assert torch.allclose(render(other, "a dog on the beach"), base, atol=1e-6)


def test_diffusers_users_load_the_lora_and_the_embeddings_with_plain_diffusers(tmp_path):
    pipe = tiny_pipeline()
    adapter = personalize(pipe, make_subject_images(), "dog", pivotal_tokens=2, **QUICK)
    path = adapter.save(tmp_path / "dog.safetensors")
    expected = render(pipe, adapter.instance_prompt)

    plain = tiny_pipeline()
    plain.load_lora_weights(path)  # the token rows ride along under keys diffusers skips
    rows = load_file(embeddings_path(path))["emb_params"]
    plain.load_textual_inversion(rows, token=adapter.tokens)  # one token per vector, as diffusers documents
    assert torch.allclose(render(plain, adapter.instance_prompt), expected, atol=1e-4)

    # A1111's way: the file is one embedding of two vectors under one name, which expands to both in a prompt.
    named = tiny_pipeline()
    named.load_lora_weights(path)
    named.load_textual_inversion(embeddings_path(path), token="<my-dog>")
    assert torch.allclose(render(named, "a <my-dog> dog"), expected, atol=1e-4)


def test_sdxl_embedding_file_holds_clip_l_and_clip_g_as_a1111_reads_them(tmp_path):
    pipe = tiny_pipeline_of("sdxl")
    adapter = personalize(pipe, make_subject_images(), "dog", pivotal_tokens=2, **QUICK)
    path = adapter.save(tmp_path / "dog.safetensors")
    expected = render(pipe, adapter.instance_prompt)
    state = load_file(embeddings_path(path))
    assert sorted(state) == ["clip_g", "clip_l"]

    plain = tiny_pipeline_of("sdxl")
    plain.load_lora_weights(path)
    # As diffusers documents for SDXL embeddings: each encoder's tensor through load_textual_inversion.
    plain.load_textual_inversion(
        state["clip_l"], token=adapter.tokens, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer
    )
    plain.load_textual_inversion(
        state["clip_g"], token=adapter.tokens, text_encoder=plain.text_encoder_2, tokenizer=plain.tokenizer_2
    )
    assert torch.allclose(render(plain, adapter.instance_prompt), expected, atol=1e-4)


def test_taken_token_names_are_renamed_on_load(tmp_path):
    pipe = tiny_pipeline()
    adapter = personalize(pipe, make_subject_images(), "dog", pivotal_tokens=2, **QUICK)
    path = adapter.save(tmp_path / "dog.safetensors")
    expected = render(pipe, adapter.instance_prompt)

    other = tiny_pipeline()
    other.load_textual_inversion(torch.zeros(1, 32), token="<s0>")  # the user's own embedding named <s0>
    loaded = load_adapter(other, path)
    assert loaded.tokens == ["<s1>", "<s2>"] and loaded.instance_prompt == "a <s1><s2> dog"
    assert loaded.subjects[0]["identifier"] == "<s1><s2>"
    assert torch.allclose(render(other, loaded.instance_prompt), expected, atol=1e-4)
    unload_adapter(other)
    assert "<s0>" in other.tokenizer.get_vocab() and "<s1>" not in other.tokenizer.get_vocab()


def test_several_subjects_get_their_own_tokens():
    from conftest import make_subject_images as dogs
    from PIL import Image

    from db_adapters import Subject

    cats = [Image.new("RGB", (40, 40), c) for c in ("black", "gray", "orange")]
    adapter = personalize(tiny_pipeline(), [Subject(dogs(), "dog"), Subject(cats, "cat")], pivotal_tokens=2, **QUICK)
    assert adapter.identifiers == ["<s0><s1>", "<s2><s3>"] and adapter.tokens == ["<s0>", "<s1>", "<s2>", "<s3>"]


def test_a_failed_run_takes_the_tokens_out_again():
    pipe = tiny_pipeline()
    before, sizes = tables(pipe), vocab_sizes(pipe)

    def stop(step, logs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        personalize(pipe, make_subject_images(), "dog", pivotal_tokens=2, callback=stop, **QUICK)
    assert vocab_sizes(pipe) == sizes and all(torch.equal(t, before[c]) for c, t in tables(pipe).items())
    assert type(pipe.text_encoder.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pivotal_tokens": 2, "identifier": "ki"}, "pivotal tuning binds the subject to new tokens"),
        ({"pivotal_tokens": 2, "strategy": "full", "train_text_encoder": True}, "trains the whole embedding table"),
        ({"pivotal_tokens": -1}, "pivotal_tokens=-1"),
    ],
)
def test_contradictory_pivotal_settings_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        personalize(tiny_pipeline(), make_subject_images(), "dog", **{**QUICK, **settings})


def test_a_kohya_export_carries_its_embeddings_file_and_generates_the_same(tmp_path):
    from db_adapters.adapter import load_for_generation
    from db_adapters.formats import export_adapter

    pipe = tiny_pipeline()
    adapter = personalize(pipe, make_subject_images(), "dog", pivotal_tokens=2, **QUICK)
    path = adapter.save(tmp_path / "dog.safetensors")
    expected = render(pipe, adapter.instance_prompt)
    exported = export_adapter(path, tmp_path / "dog_kohya.safetensors", "kohya")
    assert sorted(load_file(embeddings_path(exported))) == ["emb_params"]

    other = tiny_pipeline()
    assert load_for_generation(other, exported) == "<s0><s1>"
    assert torch.allclose(render(other, adapter.instance_prompt), expected, atol=1e-4)

    embeddings_path(exported).unlink()
    with pytest.raises(AdapterError, match="dog_kohya_emb.safetensors, which is not beside it"):
        load_for_generation(tiny_pipeline(), exported)
