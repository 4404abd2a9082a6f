"""The toy DreamBench runner: every setting of `db_adapters.toy.benchmark.CONFIGS` on every toy subject.

    python benchmarks/quality_toy.py                      # the whole grid, resumable
    python benchmarks/quality_toy.py --settings lora full --subjects star_box
    python benchmarks/quality_toy.py --workers 8 --device cuda   # on a GPU machine
    python benchmarks/quality_toy.py --report             # only rewrite the table from cached runs

Each finished (setting, subject) run is cached as JSON under `--results-dir/runs/`, keyed by the
frozen protocol's digest and the model's recommended settings, so an interrupted grid continues where
it stopped and a changed protocol or recommendation never mixes with old numbers. The table goes to
`--results-dir/quality_toy.md`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

from db_adapters.pipelines import read_recommendations
from db_adapters.toy.base import base_dir
from db_adapters.toy.benchmark import (
    ATTRIBUTE_COLUMNS,
    CONFIGS,
    PROTOCOL,
    RunPlan,
    cached_result,
    markdown_table,
    protocol_for,
    run_one,
    save_result,
    summarize,
    wrong_noun,
)
from db_adapters.toy.world import SUBJECTS

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--subjects", nargs="*", default=list(PROTOCOL.subjects), choices=list(SUBJECTS))
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/quality_toy[_BASE]")
    parser.add_argument("--model", default=None, help="toy model folder (default: the shipped one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (each loads its own pipeline)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new run after this")
    parser.add_argument("--report", action="store_true", help="only rewrite the table from cached runs")
    args = parser.parse_args(argv)
    try:
        args.protocol = protocol_for(args.model)  # the base model is part of the protocol
    except FileNotFoundError as error:
        parser.error(str(error))
    args.recommendations = read_recommendations(args.model or base_dir())  # a cached run must match them
    if args.results_dir is None:
        # v1's grid stays where it was; a later base model's grid gets its own folder beside it.
        base = args.protocol.base_model
        args.results_dir = RESULTS / ("quality_toy" if base == "v1" else f"quality_toy_{base}")
    return args


def load_pipe(model: str | None, device: str):
    from db_adapters.toy import load_base_pipeline

    return load_base_pipeline(model).to(device)


def warm_class_images(args: argparse.Namespace) -> None:
    """Generate every class prompt's images once, before workers race for the same cache files."""
    from db_adapters import personalize, unload_adapter

    pipe = load_pipe(args.model, args.device)
    nouns = {SUBJECTS[s].attributes["cls"] for s in args.subjects}
    nouns |= {wrong_noun(noun) for noun in nouns}
    for noun in sorted(nouns):
        # One step of a real run fills the cache with exactly the files later runs look up.
        personalize(
            pipe,
            SUBJECTS[args.subjects[0]].reference_images(2),
            noun,
            steps=1,
            progress=False,
            class_precision="no",  # as `personalize_as_planned` makes them
            class_image_dir=args.results_dir / "class_images",
        )
        unload_adapter(pipe)


def worker(jobs, args: argparse.Namespace, deadline: float | None) -> None:
    import torch

    from db_adapters.toy import load_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    probe = load_probe().to(args.device)
    while True:
        job = jobs.get()
        if job is None or (deadline is not None and time.time() > deadline):
            return
        setting, subject = job
        plan = RunPlan.from_config(setting, subject)
        pipe = load_pipe(args.model, args.device)
        result = run_one(plan, pipe, probe, args.results_dir / "class_images", args.protocol)
        result["device"] = args.device
        save_result(args.results_dir, result, args.protocol)
        scores = result["scores"]
        print(
            f"{setting:12s} {subject:13s} identity {scores['identity']:.2f} fidelity {scores['fidelity']:.2f} "
            f"pres {scores['pres']:.2f} div {scores['div_entropy']:.2f}  {result['wall_s']:.0f}s",
            flush=True,
        )


def run_grid(args: argparse.Namespace) -> float:
    todo = [
        (setting, subject)
        for setting in args.settings
        for subject in args.subjects
        if cached_result(args.results_dir, setting, subject, args.protocol, args.recommendations) is None
    ]
    print(f"{len(todo)} runs to do ({len(args.settings) * len(args.subjects)} in the selection)", flush=True)
    started = time.time()
    if not todo:
        return 0.0
    warm_class_images(args)
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    if args.workers <= 1:
        queue = _ListQueue(todo)
        worker(queue, args, deadline)
    else:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for job in todo:
            queue.put(job)
        for _ in range(args.workers):
            queue.put(None)
        processes = [context.Process(target=worker, args=(queue, args, deadline)) for _ in range(args.workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    return time.time() - started


class _ListQueue:
    def __init__(self, items: list) -> None:
        self.items = [*items, None]

    def get(self):
        return self.items.pop(0)


def collect(args: argparse.Namespace) -> list[dict]:
    results = []
    for setting in CONFIGS:
        for subject in PROTOCOL.subjects:
            result = cached_result(args.results_dir, setting, subject, args.protocol, args.recommendations)
            if result is not None:
                results.append(result)
    return results


def write_report(args: argparse.Namespace, elapsed: float) -> Path:
    results = collect(args)
    summary = summarize(results)
    command = "python benchmarks/quality_toy.py " + " ".join(sys.argv[1:])
    run_seconds = sum(r["wall_s"] for r in results)
    by_device: dict[str, list[str]] = {}
    for r in results:
        settings = by_device.setdefault(r.get("device", "cpu"), [])
        if r["setting"] not in settings:
            settings.append(r["setting"])
    devices = "; ".join(f"{device}: {', '.join(settings)}" for device, settings in sorted(by_device.items()))
    lines = [
        "# Toy DreamBench results",
        "",
        f"Protocol `{args.protocol.digest()}`: {args.protocol}",
        "",
        f"Last command: `{command.strip()}` ({elapsed:.0f} s wall this invocation); "
        f"{len(results)} runs cached, {run_seconds:.0f} s of run time in all. "
        f"Runs by device ({devices}); this invocation on {platform.machine()} with {os.cpu_count()} cores.",
        "",
        "## All subjects",
        "",
        markdown_table(summary, "all"),
        "",
        "## Easy subjects",
        "",
        markdown_table(summary, "easy"),
        "",
        "## Hard subjects",
        "",
        markdown_table(summary, "hard"),
        "",
    ]
    by_attribute = markdown_table(summary, "all", ATTRIBUTE_COLUMNS)
    if by_attribute.count("\n") > 1:  # runs cached before these scores existed (v1's) have no rows
        lines += [
            "## Identity by attribute (all subjects)",
            "",
            'The share of "a [V] {class}" samples the probe reads with each identity attribute right.',
            "",
            by_attribute,
            "",
        ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "quality_toy.md"
    path.write_text("\n".join(lines))
    (args.results_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    elapsed = 0.0 if args.report else run_grid(args)
    print(f"table: {write_report(args, elapsed)}")


if __name__ == "__main__":
    main()
