"""LoRA extraction on the toy model: how much of a full fine-tune a LoRA of each rank keeps.

    python benchmarks/extract_toy.py                     # star_box, full fine-tuning as the grid's full-noppl
    python benchmarks/extract_toy.py --subject ring_ball --threads 2

One full fine-tune of one toy subject on the shipped toy base model, run as the toy benchmark runs its
"full-noppl" setting (`personalize_as_planned`: the model's recommended steps, at the protocol's full
learning rate or, where the protocol leaves it to the model (v2 and later), the model's; without prior
preservation, as the setting with the clearest identity to lose), then LoRAs extracted at fixed
ranks and at energy thresholds. Each one, and the full fine-tune and the base model, generates the toy
benchmark's samples (`generate_samples`, the frozen protocol's prompts and seeds) and is scored by the
probe (`score`); pixel fidelity compares every image with the full fine-tune's at the same seed.
The table goes to benchmarks/results/extract_toy.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "extract_toy.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subject", default="star_box")
    parser.add_argument("--setting", default="full-noppl", help="the toy benchmark's full fine-tuning setting")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--energies", type=float, nargs="*", default=[0.5, 0.9])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/extract_toy"), help="adapter files go here")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the setting's)")
    return parser.parse_args(argv)


def pixels(samples) -> list:
    """Every image of a run as a float array in [0, 1], in a fixed order (identity, scenes, class)."""
    import numpy as np

    images = [*samples.identity, *(i for scene in samples.contexts.values() for i in scene), *samples.class_images]
    return [np.asarray(image, dtype=np.float64) / 255.0 for image in images]


def fidelity(images: list, reference: list) -> tuple[float, float]:
    """Mean absolute pixel difference (0-255 scale) and PSNR (dB) against the full fine-tune's images."""
    import numpy as np

    diffs = np.stack([a - b for a, b in zip(images, reference, strict=True)])
    mse = float(np.mean(diffs**2))
    return float(np.mean(np.abs(diffs))) * 255, (10 * math.log10(1 / mse) if mse > 0 else math.inf)


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from db_adapters import load_adapter, unload_adapter
    from db_adapters.adapter import attached_adapter
    from db_adapters.extract import extract_lora
    from db_adapters.toy import SUBJECTS, load_base_pipeline, load_probe
    from db_adapters.toy.benchmark import (
        PROTOCOL,
        RunPlan,
        generate_samples,
        personalize_as_planned,
        planned_prompt,
        score,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, probe, subject = load_base_pipeline(), load_probe(), SUBJECTS[args.subject]
    pipe.set_progress_bar_config(disable=True)
    references = subject.reference_images(PROTOCOL.reference_count)
    plan = RunPlan.from_config(args.setting, args.subject)
    plan.steps = args.steps or plan.steps
    identifier, prompt = planned_prompt(plan, pipe)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    def measured(name: str, **row) -> dict:
        started = time.perf_counter()
        samples = generate_samples(pipe, prompt, subject, PROTOCOL)
        row.update(name=name, scores=score(probe, subject, references, samples), images=pixels(samples))
        row["sample_s"] = time.perf_counter() - started
        print(f"{name:12s} identity {row['scores']['identity']:.3f} dino {row['scores']['probe_dino']:.3f}", flush=True)
        return row

    rows = [measured("base model")]
    started = time.perf_counter()
    personalize_as_planned(pipe, plan, references, identifier, prompt, args.work_dir / "class_images")
    train_s = time.perf_counter() - started
    full_path = attached_adapter(pipe).save(args.work_dir / "full.safetensors")
    rows.append(measured("full fine-tune", path=full_path, train_s=train_s))
    unload_adapter(pipe)

    settings = [("rank", rank) for rank in args.ranks] + [("energy", energy) for energy in args.energies]
    for kind, value in settings:
        started = time.perf_counter()
        extraction = extract_lora(pipe, full_path, **{kind: value})
        path = extraction.save(args.work_dir / f"{kind}_{value}.safetensors")
        extract_s = time.perf_counter() - started
        ranks = [layer.rank for layer in extraction.layers]
        load_adapter(pipe, path)
        try:
            rows.append(
                measured(
                    f"{kind} {value}",
                    path=path,
                    extract_s=extract_s,
                    retained=extraction.retained_energy,
                    left_out=1 - extraction.layer_change / extraction.total_change,
                    ranks=(min(ranks), statistics.median(ranks), max(ranks)),
                    layers=len(ranks),
                )
            )
        finally:
            unload_adapter(pipe)
    return rows


def table(rows: list[dict]) -> list[str]:
    full = next(row for row in rows if row["name"] == "full fine-tune")
    lines = [
        "| model | layer ranks (min / median / max) | file bytes | retained energy | identity | probe-DINO "
        "| prompt fidelity | mean abs pixel diff vs full (0-255) | PSNR vs full (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mae, psnr = fidelity(row["images"], full["images"])
        ranks = " / ".join(f"{r:g}" for r in row["ranks"]) if "ranks" in row else "-"
        size = f"{row['path'].stat().st_size:,}" if "path" in row else "-"
        retained = f"{row['retained']:.4f}" if "retained" in row else "-"
        s = row["scores"]
        lines.append(
            f"| {row['name']} | {ranks} | {size} | {retained} | {s['identity']:.3f} | {s['probe_dino']:.3f} "
            f"| {s['fidelity']:.3f} | {mae:.2f} | {psnr:.1f} |"
        )
    return lines


def write_report(args: argparse.Namespace, rows: list[dict], wall_s: float) -> Path:
    from db_adapters.extract import full_fine_tune_info
    from db_adapters.safe_reading import read_header
    from db_adapters.toy import SUBJECTS
    from db_adapters.toy.benchmark import PROTOCOL

    noun = SUBJECTS[args.subject].attributes["cls"]
    full = next(row for row in rows if row["name"] == "full fine-tune")
    info = full_fine_tune_info(full["path"])
    components = sorted({key.partition(".")[0] for key in read_header(full["path"]).tensors})
    extracted = [row for row in rows if "extract_s" in row]
    left_out = extracted[0]["left_out"] if extracted else 0.0
    images = len(full["images"])
    lines = [
        "# LoRA extraction from a full fine-tune (toy model)",
        "",
        f"Command: `{' '.join(['python benchmarks/extract_toy.py', *sys.argv[1:]])}`",
        f"on {platform.machine()} with {os.cpu_count()} cores (CPU, shared), wall time {wall_s:.0f} s: "
        f"full fine-tuning {full['train_s']:.0f} s, each extraction "
        f"{min(r['extract_s'] for r in extracted):.1f}-{max(r['extract_s'] for r in extracted):.1f} s, "
        f"each row's {images} samples {statistics.median(r['sample_s'] for r in rows):.0f} s (median).",
        "",
        f"Subject `{args.subject}`, fine-tuned as the toy benchmark's `{args.setting}` setting (strategy full, "
        f"learning rate {info['learning_rate']}, {info['steps']} steps, seed {PROTOCOL.train_seed}); "
        f"every row renders the protocol's {images} samples (`{PROTOCOL.digest()}`: {PROTOCOL.identity_samples} "
        f'"a [V] {noun}", {PROTOCOL.context_scenes} scenes x {PROTOCOL.context_samples}, {PROTOCOL.class_samples} '
        f'"a {noun}", seeds from {PROTOCOL.sample_seed}, {PROTOCOL.sample_steps} steps, guidance '
        f"{PROTOCOL.guidance_scale}), scored by the probe (`db_adapters.toy.benchmark.score`). Pixel fidelity "
        "compares all of them with the full fine-tune's image of the same prompt and seed.",
        "",
        f"Retained energy: share of the Linear and Conv2d weights' squared change the LoRA keeps. What no LoRA "
        f"holds (biases, norm weights, embeddings) is {left_out:.2%} of the fine-tune's whole squared change. "
        f"The full fine-tune's file holds every weight of {' and '.join(components)}: "
        f"{full['path'].stat().st_size:,} bytes (fp32, as are the LoRA files).",
        "",
        *table(rows),
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    return args.output


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = run(args)
    print(f"table: {write_report(args, rows, time.perf_counter() - started)}")


if __name__ == "__main__":
    main()
