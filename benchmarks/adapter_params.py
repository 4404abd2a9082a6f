"""Trainable parameters of each toy-benchmark setting: what the adapter kinds were sized against.

    python benchmarks/adapter_params.py                  # every trained setting of CONFIGS
    python benchmarks/adapter_params.py --settings lora dora loha lokr oft
    python benchmarks/adapter_params.py --candidates     # the sizes the adapter kinds were chosen from

Applies each setting's strategy, with its options exactly as `RunPlan.from_config` resolves them,
to the shipped toy base model (denoiser only, as the benchmark trains), counts the parameters the
trainer would optimise (`Strategy.trainable_parameters`) and takes the adapter out again. Prints a
markdown table with each count's difference from the default `lora` setting (LoRA rank 4).
`--candidates` counts the other sizes of each kind too, so the choice of the closest can be checked.
"""

from __future__ import annotations

import argparse

from db_adapters.families import family_of
from db_adapters.strategies import get_strategy
from db_adapters.toy import load_base_pipeline
from db_adapters.toy.benchmark import CONFIGS, RunPlan

REFERENCE = "lora"
TRAINED_SETTINGS = [name for name in CONFIGS if CONFIGS[name].get("train", True)]
# Each kind's sizes around LoRA rank 4's. They were chosen on v1, whose adapted UNet layers are all 64 x 64;
# on v2 (64 to 128 wide) the same options still land within 13% of LoRA rank 4 (51,968 parameters).
# LoKr decompose_factor 1 comes closest but is not chosen: a 1 x 1 first factor makes it LoRA times a scalar.
CANDIDATES = {
    "loha": [{"rank": r} for r in (1, 2, 3)],
    "lokr": [{"rank": 4, "decompose_factor": 1}]
    + [{"rank": r, "decompose_factor": f} for f in (-1, 2, 4, 16) for r in (4, 8, 16)],
    "oft": [{"block_size": b} for b in (4, 8, 16, 32)],
}


def trainable_count(pipe, plan: RunPlan) -> int:
    """Parameters the trainer would optimise for `plan`'s strategy and options on `pipe` (left as it was)."""
    strategy = get_strategy(plan.strategy)(**plan.strategy_options)
    strategy.apply(pipe, family_of(pipe), train_text_encoder=False)
    try:
        return sum(p.numel() for params in strategy.trainable_parameters(pipe).values() for p in params)
    finally:
        strategy.remove(pipe)


def count_plans(plans: dict[str, RunPlan]) -> dict[str, tuple[RunPlan, int]]:
    """{name: (its plan, its trainable count)}, the reference setting first."""
    pipe = load_base_pipeline()
    plans = {REFERENCE: RunPlan.from_config(REFERENCE, "star_box"), **plans}
    return {name: (plan, trainable_count(pipe, plan)) for name, plan in plans.items()}


def setting_plans(settings: list[str]) -> dict[str, RunPlan]:
    return {name: RunPlan.from_config(name, "star_box") for name in settings}


def candidate_plans() -> dict[str, RunPlan]:
    plans = [
        RunPlan(f"{kind} ({options_text(options)})", "star_box", strategy=kind, strategy_options=options)
        for kind, options_list in CANDIDATES.items()
        for options in options_list
    ]
    return {plan.setting: plan for plan in plans}


def options_text(options: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items()) or "defaults"


def markdown(counts: dict[str, tuple[RunPlan, int]]) -> str:
    reference = counts[REFERENCE][1]
    lines = ["| setting | strategy | options | trainable | vs lora |", "|---|---|---|---|---|"]
    for name, (plan, count) in counts.items():
        change = f"{count - reference:+,} ({(count - reference) / reference:+.1%})"
        lines.append(f"| {name} | {plan.strategy} | {options_text(plan.strategy_options)} | {count:,} | {change} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="*", default=TRAINED_SETTINGS, choices=TRAINED_SETTINGS)
    parser.add_argument("--candidates", action="store_true", help="count each kind's other sizes instead")
    args = parser.parse_args(argv)
    print(markdown(count_plans(candidate_plans() if args.candidates else setting_plans(args.settings))))


if __name__ == "__main__":
    main()
