"""Which identity attribute the toy benchmark's identity rate loses: a per-attribute diagnosis.

    python benchmarks/identity_attributes.py                       # lora, the 8 toy subjects
    python benchmarks/identity_attributes.py --setting steps-1000 --subjects star_box ring_ball

The identity rate of `quality_toy.py` counts an image only when class, colour, pattern, second
colour and mark all match the subject, so one attribute the model cannot draw zeroes it. For each
subject this reads, with the probe, the share of images that get each attribute right in three
sets: the reference photos (is the probe able to see it?), the base model asked in words for the
whole look (`caption(**attributes)`: can the base model draw it at all?), and "a [V] {class}"
after personalizing as the benchmark setting says (same plan, seeds and sample count). Writes
`--out` (markdown) and prints it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from db_adapters.toy import caption, load_base_pipeline, load_probe
from db_adapters.toy.benchmark import CONFIGS, PROTOCOL, RunPlan, _generate, personalize_as_planned, planned_prompt
from db_adapters.toy.world import IDENTITY_ATTRIBUTES, SUBJECTS

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "identity_attributes.md"


def attribute_rates(reads: list[dict[str, str]], attributes: dict[str, str]) -> dict[str, float]:
    """Share of probe readings that get each identity attribute right, and all of them at once."""
    rates = {name: sum(r[name] == attributes[name] for r in reads) / len(reads) for name in IDENTITY_ATTRIBUTES}
    rates["all"] = sum(all(r[n] == attributes[n] for n in IDENTITY_ATTRIBUTES) for r in reads) / len(reads)
    return rates


def personalized_samples(pipe, plan: RunPlan, class_image_dir: Path) -> list:
    """The instance-prompt images after personalizing `pipe` as the benchmark's `plan` does."""
    from db_adapters import unload_adapter

    identifier, prompt = planned_prompt(plan, pipe, PROTOCOL)
    references = SUBJECTS[plan.subject].reference_images(PROTOCOL.reference_count)
    personalize_as_planned(pipe, plan, references, identifier, prompt, class_image_dir, PROTOCOL)
    try:
        return _generate(pipe, prompt, PROTOCOL.identity_samples, PROTOCOL.sample_seed, PROTOCOL)
    finally:
        unload_adapter(pipe)


def diagnose(subject_name: str, setting: str, class_image_dir: Path, probe) -> dict[str, dict[str, float]]:
    subject = SUBJECTS[subject_name]
    pipe = load_base_pipeline()
    words = caption(**subject.attributes)
    sets = {
        "references": subject.reference_images(PROTOCOL.reference_count),
        f"base: '{words}'": _generate(pipe, words, PROTOCOL.identity_samples, PROTOCOL.sample_seed, PROTOCOL),
        f"{setting}: 'a [V] {subject.attributes['cls']}'": personalized_samples(
            pipe, RunPlan.from_config(setting, subject_name), class_image_dir
        ),
    }
    return {name: attribute_rates(probe.predict(images), subject.attributes) for name, images in sets.items()}


def markdown(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    columns = [*IDENTITY_ATTRIBUTES, "all"]
    lines = [
        "| subject | images | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for subject, name, rates in rows:
        lines.append(f"| {subject} | {name} | " + " | ".join(f"{rates[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="lora", choices=list(CONFIGS))
    parser.add_argument("--subjects", nargs="*", default=list(PROTOCOL.subjects), choices=list(SUBJECTS))
    parser.add_argument(
        "--class-image-dir",
        type=Path,
        default=RESULTS / "quality_toy" / "class_images",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    started = time.perf_counter()
    probe = load_probe()
    rows = []
    for name in args.subjects:
        for images, rates in diagnose(name, args.setting, args.class_image_dir, probe).items():
            rows.append((name, images, rates))
            print(f"{name:13s} {images:60s} " + " ".join(f"{k} {v:.2f}" for k, v in rates.items()), flush=True)
    wall = time.perf_counter() - started
    command = (
        "python benchmarks/identity_attributes.py --setting " + args.setting + " --subjects " + " ".join(args.subjects)
    )
    text = (
        "# Identity rate by attribute\n\n"
        f"Share of probe readings with each identity attribute right; `all` is the benchmark's identity rate. "
        f"Protocol `{PROTOCOL.digest()}`, {PROTOCOL.identity_samples} samples per set "
        f"({PROTOCOL.reference_count} for references).\n\n"
        f"Command: `{command}` ({wall:.0f} s wall).\n\n{markdown(rows)}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
