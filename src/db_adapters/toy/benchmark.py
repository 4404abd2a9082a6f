"""The toy DreamBench: personalize every toy subject under a grid of settings and score it with the probe.

The probe plays DreamBench's evaluators on the toy world: it reads each generated image back into
attributes, so "is this the subject?" and "is it in the asked scene?" are counted instead of
estimated from embeddings, and its L2-normalised features stand in for DINO.

Per (setting, subject) run, against the same seeds every time:
- identity rate: share of "a [V] {class}" images whose class, colour, pattern, second colour and
  mark all match the subject; `identity_{attribute}`: the share with that one attribute right;
- probe-DINO: mean cosine of probe features, those images vs the reference photos;
- prompt fidelity: share of "a [V] {class} {scene}" images (3 scenes the references never show)
  in the asked scene; `context_identity` is the identity rate among the same images;
- overfit: share of those recontextualised images showing a reference-photo scene instead;
- PRES: share of "a {class}" images, after fine-tuning, that match the subject (`pres`), and the
  probe-cosine form (`pres_cosine`, as the paper's DINO-based PRES);
- DIV: mean entropy in bits of the probe-read colour/pattern/second-colour/mark over "a {class}"
  images (`div_entropy`), and their mean pairwise probe distance, 1 - cosine (`div_distance`).

The protocol (subjects, prompts, seeds, sample counts) is frozen in `PROTOCOL`; its hash is part of
every cached result, so changing it invalidates the cache instead of mixing numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .world import CLASSES, IDENTITY_ATTRIBUTES, SCENE_PHRASES, SUBJECTS, Subject

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from .probe import Probe

DIVERSITY_ATTRIBUTES = ("color", "pattern", "second_color", "mark")


@dataclass(frozen=True)
class Protocol:
    """Everything fixed before the first run: which subjects, how many samples, which seeds."""

    subjects: tuple[str, ...] = tuple(SUBJECTS)
    reference_count: int = 5
    train_seed: int = 0
    identity_samples: int = 16
    context_scenes: int = 3
    context_samples: int = 8  # per scene
    class_samples: int = 32
    sample_seed: int = 5000
    sample_steps: int = 20
    guidance_scale: float = 4.0
    common_word: str = "night"  # a trained word with a strong (scene) prior, as "a common English word"
    rare_letters: str = "sks"  # the community's pick: split into letters by the toy tokenizer
    # The "full" setting's learning rate; None: the model folder's recommendation for `full`, as LoRA
    # uses its recommendation. v1 recommended one rate for every strategy, so its protocol fixed this
    # one; v2 and later recommend a rate per strategy, and `protocol_for` gives them None.
    full_learning_rate: float | None = 1e-4
    # The base model the numbers belong to (`base.model_name` of its folder): a shipped model's name, "v1"
    # (the first 1.7M-parameter UNet), "v2" (the retrained one), "v3" (v2 on a wider VAE) or "v4" (v3
    # trained further), or for other weights their architecture and digest ("v3-1a2b3c4d").
    # `protocol_for` reads it off a model folder.
    base_model: str = "v1"

    def digest(self) -> str:
        fields = asdict(self)
        if fields["base_model"] == "v1":
            # v1's runs were cached before this field existed: leaving it out keeps their digest valid.
            del fields["base_model"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def protocol_for(model: str | Path | None = None) -> Protocol:
    """The frozen protocol for the toy model in `model` (default: the shipped one).

    Example:
        >>> protocol_for().base_model  # the shipped model's name
        'v4'
    """
    from .base import architecture_name, model_name

    name = model_name(model)
    if architecture_name(model) == "v1":
        return Protocol(base_model=name)
    return Protocol(base_model=name, full_learning_rate=None)


PROTOCOL = protocol_for()

# Each setting changes one thing from "lora" (the default: LoRA rank 4, prior preservation, the
# binder's identifier, and the toy model's recommended steps, learning rate and text-encoder training:
# v1 300 steps at 1e-3, UNet only; v2 400 steps at 1e-3 with the text encoder; v3 300 steps at 1e-3 with
# the text encoder, and `full` 400 steps at 1e-4; v4 the same but `full` 300 steps at 7e-5). The class-noun ablation
# runs without prior preservation, as "a [V]" alone has no class prompt to preserve: it is read against
# "lora-noppl". The adapter kinds (the last four) change the strategy, sized to LoRA rank 4's trainable
# parameters on the toy UNet (`benchmarks/adapter_params.py` counts them); like every setting but
# "full" they take the learning rate the toy model recommends for every strategy (1e-3).
CONFIGS: dict[str, dict[str, Any]] = {
    "base": {"train": False},
    "lora": {},
    "lora-noppl": {"prior_preservation": False},
    "full": {"strategy": "full"},
    "noun-wrong": {"prior_preservation": False, "noun": "wrong"},
    "noun-none": {"prior_preservation": False, "noun": "none"},
    "id-common": {"identifier": "common"},
    "id-sks": {"identifier": "letters"},
    "lora-r1": {"rank": 1},
    "lora-r16": {"rank": 16},
    "steps-100": {"steps": 100},
    "steps-200": {"steps": 200},
    "steps-600": {"steps": 600},
    "steps-1000": {"steps": 1000},
    "full-noppl": {"strategy": "full", "prior_preservation": False},
    # Trainable on the UNet, v1 / v2 (LoRA rank 4: 28,672 / 51,968):
    "dora": {"strategy": "dora"},  # rank 4 and a magnitude vector per adapted layer: 32,256 / 58,368
    "loha": {"strategy": "loha", "rank": 2},  # two rank-2 pairs per layer: 28,672 / 51,968
    "lokr": {"strategy": "lokr", "rank": 8, "decompose_factor": 2},  # a 2x2 factor (x) a rank-8 one: 28,896 / 52,192
    "oft": {"strategy": "oft", "block_size": 16},  # 16x16 blocks: 26,880 / 49,440
}
# The keys of a setting that are strategy options rather than `RunPlan` fields.
STRATEGY_OPTION_KEYS = ("rank", "decompose_factor", "block_size")


# ---------------------------------------------------------------------------------------------------- scores


def matches_identity(read: dict[str, str], subject: Subject) -> bool:
    """Whether the probe's reading shows the subject: every identity attribute equal."""
    return all(read[name] == subject.attributes[name] for name in IDENTITY_ATTRIBUTES)


def identity_rate(reads: Sequence[dict[str, str]], subject: Subject) -> float:
    """Share of readings that show the subject.

    Args:
        reads (`list[dict]`): `Probe.predict` output.
        subject (`Subject`): the subject.

    Example:
        >>> s = SUBJECTS["star_box"]
        >>> identity_rate([dict(s.attributes), dict(s.attributes, mark="ring")], s)
        0.5
    """
    return sum(matches_identity(read, subject) for read in reads) / len(reads)


def attribute_rate(reads: Sequence[dict[str, str]], subject: Subject, name: str) -> float:
    """Share of readings whose attribute `name` is the subject's.

    Example:
        >>> s = SUBJECTS["star_box"]
        >>> attribute_rate([dict(s.attributes), dict(s.attributes, mark="ring")], s, "mark")
        0.5
    """
    return sum(read[name] == subject.attributes[name] for read in reads) / len(reads)


def scene_rate(reads: Sequence[dict[str, str]], scenes: Sequence[str]) -> float:
    """Share of readings whose scene is one of `scenes`."""
    return sum(read["scene"] in scenes for read in reads) / len(reads)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of two sets of unit vectors (the DINO-score form)."""
    return float((a @ b.T).mean())


def mean_pairwise_distance(vectors: torch.Tensor) -> float:
    """Mean 1 - cosine over distinct pairs of one set of unit vectors (a DIV form).

    Example:
        >>> import torch
        >>> mean_pairwise_distance(torch.eye(3))
        1.0
    """
    n = vectors.shape[0]
    if n < 2:
        raise InputError("a pairwise distance needs at least two vectors")
    cosines = vectors @ vectors.T
    off_diagonal = (cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))
    return float(1.0 - off_diagonal)


def entropy_bits(values: Sequence[str]) -> float:
    """Shannon entropy, in bits, of the empirical distribution of `values`.

    Example:
        >>> entropy_bits(["red", "blue", "red", "blue"])
        1.0
    """
    counts = Counter(values)
    total = len(values)
    return float(-sum(c / total * math.log2(c / total) for c in counts.values()) + 0.0)


def attribute_entropy(reads: Sequence[dict[str, str]], names: Sequence[str] = DIVERSITY_ATTRIBUTES) -> float:
    """Mean entropy in bits over `names` of the probe-read values (0 = every image alike)."""
    return sum(entropy_bits([read[name] for read in reads]) for name in names) / len(names)


@dataclass
class Samples:
    """The images one run generates: the subject alone, in new scenes, and the bare class."""

    identity: list[Image.Image]
    contexts: dict[str, list[Image.Image]]
    class_images: list[Image.Image]


def score(probe: Probe, subject: Subject, references: list[Image.Image], samples: Samples) -> dict[str, float]:
    """Every benchmark number for one run, read by `probe` (see the module docstring)."""
    reference_vectors = probe.embed(references)
    identity_reads = probe.predict(samples.identity)
    context_reads = {scene: probe.predict(images) for scene, images in samples.contexts.items()}
    all_context = [read for reads in context_reads.values() for read in reads]
    class_reads = probe.predict(samples.class_images)
    class_vectors = probe.embed(samples.class_images)
    return {
        "identity": identity_rate(identity_reads, subject),
        "probe_dino": mean_cosine(probe.embed(samples.identity), reference_vectors),
        "fidelity": sum(scene_rate(reads, [scene]) * len(reads) for scene, reads in context_reads.items())
        / len(all_context),
        "context_identity": identity_rate(all_context, subject),
        "overfit": scene_rate(all_context, subject.reference_scenes),
        "pres": identity_rate(class_reads, subject),
        "pres_cosine": mean_cosine(class_vectors, reference_vectors),
        "div_entropy": attribute_entropy(class_reads),
        "div_distance": mean_pairwise_distance(class_vectors),
        "class_accuracy": sum(read["cls"] == subject.attributes["cls"] for read in class_reads) / len(class_reads),
        # Which attribute a low identity misses (the share of "a [V] {class}" samples with each right).
        **{f"identity_{name}": attribute_rate(identity_reads, subject, name) for name in IDENTITY_ATTRIBUTES},
    }


# ---------------------------------------------------------------------------------------------------- one run


def novel_scenes(subject: Subject, count: int) -> list[str]:
    """The first `count` scenes the subject's reference photos never show."""
    return [scene for scene in SCENE_PHRASES if scene not in subject.reference_scenes][:count]


def wrong_noun(cls: str) -> str:
    """The class noun the "wrong noun" ablation uses: the next class of the world."""
    return CLASSES[(CLASSES.index(cls) + 1) % len(CLASSES)]


@dataclass
class RunPlan:
    """What one (setting, subject) run trains with, resolved from `CONFIGS`."""

    setting: str
    subject: str
    train: bool = True
    strategy: str = "lora"
    prior_preservation: bool = True
    noun: str = "correct"
    identifier: str = "binder"
    steps: int | None = None
    learning_rate: float | None = None  # None: the protocol's for `full` if it fixes one, else the model's
    train_text_encoder: bool | None = None  # None: the toy model's recommendation
    strategy_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, setting: str, subject: str) -> RunPlan:
        if setting not in CONFIGS:
            raise InputError(f"unknown setting {setting!r}; choose from {', '.join(CONFIGS)}.")
        if subject not in SUBJECTS:
            raise InputError(f"unknown subject {subject!r}; choose from {', '.join(SUBJECTS)}.")
        config = dict(CONFIGS[setting])
        options = {key: config.pop(key) for key in STRATEGY_OPTION_KEYS if key in config}
        return cls(setting, subject, strategy_options=options, **config)


def _class_noun(plan: RunPlan, subject: Subject) -> str | None:
    cls = subject.attributes["cls"]
    return {"correct": cls, "wrong": wrong_noun(cls), "none": None}[plan.noun]


def _identifier(plan: RunPlan, pipe: StableDiffusionPipeline, noun: str, protocol: Protocol) -> str:
    from ..binder import choose_identifier

    if plan.identifier == "common":
        return protocol.common_word
    if plan.identifier == "letters":
        return protocol.rare_letters
    return choose_identifier(pipe.tokenizer, noun, seed=protocol.train_seed)


def _generate(pipe: StableDiffusionPipeline, prompt: str, count: int, seed: int, protocol: Protocol) -> list:
    from ..generation import render

    return render(
        pipe,
        prompt,
        num_images=count,
        seed=seed,
        steps=protocol.sample_steps,
        guidance_scale=protocol.guidance_scale,
    )


def generate_samples(pipe: StableDiffusionPipeline, instance_prompt: str, subject: Subject, protocol: Protocol):
    """The run's images, each prompt on its own fixed seeds (the same in every setting)."""
    seed = protocol.sample_seed
    contexts = {
        scene: _generate(
            pipe,
            f"{instance_prompt} {SCENE_PHRASES[scene]}",
            protocol.context_samples,
            seed + 1000 * (k + 1),
            protocol,
        )
        for k, scene in enumerate(novel_scenes(subject, protocol.context_scenes))
    }
    return Samples(
        identity=_generate(pipe, instance_prompt, protocol.identity_samples, seed, protocol),
        contexts=contexts,
        class_images=_generate(pipe, f"a {subject.attributes['cls']}", protocol.class_samples, seed + 10**5, protocol),
    )


def planned_prompt(plan: RunPlan, pipe: StableDiffusionPipeline, protocol: Protocol = PROTOCOL) -> tuple[str, str]:
    """The identifier and the instance prompt ("a [V] {noun}", or "a [V]" without a noun) of `plan`."""
    subject = SUBJECTS[plan.subject]
    noun = _class_noun(plan, subject)
    identifier = _identifier(plan, pipe, noun or subject.attributes["cls"], protocol)
    return identifier, f"a {identifier} {noun}" if noun else f"a {identifier}"


def personalize_as_planned(
    pipe: StableDiffusionPipeline,
    plan: RunPlan,
    references: list[Image.Image],
    identifier: str,
    instance_prompt: str,
    class_image_dir: Path,
    protocol: Protocol = PROTOCOL,
) -> None:
    """Personalize `pipe` on `references` with the strategy, steps, noun and prior setting of `plan`."""
    from ..api import personalize

    subject = SUBJECTS[plan.subject]
    options: dict[str, Any] = dict(plan.strategy_options)
    if plan.strategy == "full" and protocol.full_learning_rate is not None:
        options["learning_rate"] = protocol.full_learning_rate
    if plan.learning_rate is not None:
        options["learning_rate"] = plan.learning_rate
    if plan.steps is not None:
        options["steps"] = plan.steps
    if plan.train_text_encoder is not None:
        options["train_text_encoder"] = plan.train_text_encoder
    personalize(
        pipe,
        references,
        _class_noun(plan, subject) or subject.attributes["cls"],
        strategy=plan.strategy,
        identifier=identifier,
        instance_prompt=instance_prompt,
        prior_preservation=plan.prior_preservation,
        class_image_dir=class_image_dir,
        # fp32 class images on every CPU (the default is bf16 where the CPU computes it natively): the
        # grid's figures were made so, and stay the same on machines with and without bf16 hardware.
        class_precision="no",
        seed=protocol.train_seed,
        progress=False,
        **options,
    )


def run_one(
    plan: RunPlan,
    pipe: StableDiffusionPipeline,
    probe: Probe,
    class_image_dir: Path,
    protocol: Protocol = PROTOCOL,
) -> dict[str, Any]:
    """Personalize `pipe` as `plan` says, score the result, and take the adapter out again.

    Args:
        plan (`RunPlan`): the setting and subject.
        pipe (`StableDiffusionPipeline`): the toy base model (left as it was).
        probe (`Probe`): the frozen probe.
        class_image_dir (`Path`): the shared class-image cache.
        protocol (`Protocol`): the frozen protocol.

    Example:
        >>> from db_adapters.toy import load_base_pipeline, load_probe
        >>> plan = RunPlan.from_config("lora", "star_box")
        >>> result = run_one(plan, load_base_pipeline(), load_probe(), Path("cache"))  # doctest: +SKIP
        >>> 0 <= result["scores"]["identity"] <= 1  # doctest: +SKIP
        True
    """
    from ..adapter import unload_adapter
    from ..pipelines import model_id, read_recommendations

    subject = SUBJECTS[plan.subject]
    references = subject.reference_images(protocol.reference_count)
    identifier, instance_prompt = planned_prompt(plan, pipe, protocol)
    started = time.perf_counter()
    train_s = 0.0
    if plan.train:
        personalize_as_planned(pipe, plan, references, identifier, instance_prompt, class_image_dir, protocol)
        train_s = time.perf_counter() - started
    try:
        samples = generate_samples(pipe, instance_prompt, subject, protocol)
    finally:
        if plan.train:
            unload_adapter(pipe)
    scores = score(probe, subject, references, samples)
    return {
        "setting": plan.setting,
        "subject": plan.subject,
        "difficulty": subject.difficulty,
        "identifier": identifier,
        "instance_prompt": instance_prompt,
        "plan": asdict(plan),
        # What the settings the plan leaves out resolved from: editing the model's recommendations
        # must not let a cached run stand for the new ones (`cached_result` compares them).
        "recommendations": read_recommendations(model_id(pipe)),
        "scores": scores,
        "train_s": round(train_s, 2),
        "wall_s": round(time.perf_counter() - started, 2),
    }


# ---------------------------------------------------------------------------------------------------- cache


def result_path(results_dir: Path, setting: str, subject: str) -> Path:
    return Path(results_dir) / "runs" / setting / f"{subject}.json"


def cached_result(
    results_dir: Path,
    setting: str,
    subject: str,
    protocol: Protocol = PROTOCOL,
    recommendations: dict[str, Any] | None = None,
) -> dict | None:
    """A finished run's result, or None when missing or made under another protocol, base model or
    recommendation.

    Args:
        results_dir (`Path`): the grid's results folder (runs are under `runs/SETTING/SUBJECT.json`).
        setting (`str`): a `CONFIGS` name.
        subject (`str`): a toy subject's name.
        protocol (`Protocol`): the protocol the run must have been made under.
        recommendations (`dict | None`): the model folder's `db_adapters.json` now
            (`pipelines.read_recommendations`); a run made under other recommendations is not reused.
            Runs cached before runs recorded them (the v1-v4 grids, to 2026-12-07) are taken as they are.
            None: not checked.

    Example:
        >>> cached_result(Path("benchmarks/results/quality_toy_v4"), "lora", "star_box")["setting"]
        'lora'
    """
    path = result_path(results_dir, setting, subject)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("protocol") != protocol.digest():
        return None
    if recommendations is not None and result.get("recommendations", recommendations) != recommendations:
        return None
    return result


def save_result(results_dir: Path, result: dict[str, Any], protocol: Protocol = PROTOCOL) -> Path:
    from ..files import write_atomically

    text = json.dumps({**result, "protocol": protocol.digest()}, indent=1, sort_keys=True)
    return write_atomically(
        result_path(results_dir, result["setting"], result["subject"]), lambda tmp: tmp.write_text(text)
    )


# ---------------------------------------------------------------------------------------------------- table

HEADLINE = ("identity", "probe_dino", "fidelity", "context_identity", "overfit", "pres", "pres_cosine", "div_entropy")


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean scores per setting, over all subjects and per difficulty: {setting: {group: {metric: mean}}}."""
    grouped: dict[str, dict[str, list[dict[str, float]]]] = {}
    for result in results:
        groups = grouped.setdefault(result["setting"], {})
        for group in ("all", result["difficulty"]):
            groups.setdefault(group, []).append(result["scores"])
    return {
        setting: {
            group: {
                # Only the scores every run has: runs cached before a score existed lack it.
                **{name: sum(s[name] for s in scores) / len(scores) for name in set.intersection(*map(set, scores))},
                "n": float(len(scores)),
            }
            for group, scores in groups.items()
        }
        for setting, groups in grouped.items()
    }


ATTRIBUTE_COLUMNS = tuple(f"identity_{name}" for name in IDENTITY_ATTRIBUTES)


def markdown_table(
    summary: dict[str, dict[str, dict[str, float]]], group: str = "all", columns: Sequence[str] | None = None
) -> str:
    """One row per setting (in `CONFIGS` order) of the means of `columns` for `group` ("all", "easy", "hard").

    `columns` defaults to the headline scores; a setting whose runs lack one of them is left out.
    """
    columns = tuple(columns or (*HEADLINE, "div_distance"))
    lines = [
        "| setting | n | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for setting in CONFIGS:
        row = summary.get(setting, {}).get(group)
        if row is None or any(name not in row for name in columns):
            continue
        cells = " | ".join(f"{row[name]:.3f}" for name in columns)
        lines.append(f"| {setting} | {int(row['n'])} | {cells} |")
    return "\n".join(lines)
