"""Every Python snippet in README.md runs, on the tiny pipelines instead of the hub's models.

The hub ids become folders of the tiny pipelines (whose `db_adapters.json` recommends a few steps
and class images, as the toy model's does), "cuda" becomes "cpu", and each snippet runs in a fresh
namespace in a folder that holds `dog/` and `cat/`, the way a reader would run it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import make_subject_images

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "black-forest-labs/FLUX.1-dev": "flux",
}
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    from db_adapters.testing import tiny_pipeline_of

    folders = {}
    for family in sorted(set(HUB_IDS.values())):
        folder = tmp_path_factory.mktemp("models") / family
        tiny_pipeline_of(family).save_pretrained(folder)
        # A saved Flux folder forgets the tiny default size (FluxPipeline fixes 128 latents): the folder
        # recommends the size it was made at, as a model folder may.
        recommended = {"steps": 3, "num_class_images": 2, "class_inference_steps": 2, "resolution": 32}
        (folder / "db_adapters.json").write_text(json.dumps(recommended))
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reader")
    for subject in ("dog", "cat"):
        (folder / subject).mkdir()
        for i, image in enumerate(make_subject_images()):
            image.save(folder / subject / f"{i}.png")
    return folder


def test_the_readme_has_snippets_for_every_hub_id():
    assert len(SNIPPETS) >= 5
    for hub_id in HUB_IDS:
        assert any(hub_id in snippet for snippet in SNIPPETS), hub_id


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, model_folders, workdir, monkeypatch):
    code = SNIPPETS[index]
    for hub_id, family in HUB_IDS.items():
        code = code.replace(f'"{hub_id}"', repr(str(model_folders[family])))
    code = code.replace('"cuda"', '"cpu"')
    monkeypatch.chdir(workdir)
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": f"readme_{index}"})
