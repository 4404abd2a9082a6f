"""DreamBench (google/dreambooth): its 25 object prompts, 25 live-subject prompts and 30 subjects.

The lists ship as data in `assets/dreambench/`, exactly as the benchmark's
`dataset/prompts_and_classes.txt` writes them: `{0}` is the identifier, `{1}` the class noun. Both
lists share prompts 1-10 and 21-25; 11-20 are scenes for objects and outfits for live subjects.

Example:
    >>> templates = dreambench_prompts(live=True)
    >>> len(templates), format_prompt(templates[0], "olg", "dog")
    (25, 'a olg dog in the jungle')
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from ..errors import InputError

PROMPTS_PER_LIST = 25


@dataclass(frozen=True)
class Subject:
    """One DreamBench subject: its dataset folder, class noun, and whether it is a live subject."""

    folder: str
    class_noun: str
    live: bool


def dreambench_prompts(live: bool) -> list[str]:
    """The 25 DreamBench prompt templates, with `{0}` (identifier) and `{1}` (class noun) placeholders.

    Args:
        live (`bool`): the live-subject list (pets: outfits, hats) instead of the object list.

    Example:
        >>> dreambench_prompts(live=False)[-1]
        'a cube shaped {0} {1}'
    """
    return list(_prompt_file("prompts_live.txt" if live else "prompts_objects.txt"))


def dreambench_subjects() -> dict[str, Subject]:
    """The 30 DreamBench subjects by folder name.

    Example:
        >>> dreambench_subjects()["bear_plushie"]
        Subject(folder='bear_plushie', class_noun='stuffed animal', live=False)
    """
    return dict(_subjects())


def format_prompt(template: str, identifier: str | None, class_noun: str) -> str:
    """Fill a template; an empty or missing identifier gives the class prompt ("a dog in the jungle").

    Args:
        template (`str`): a DreamBench template such as "a {0} {1} in the snow".
        identifier (`str | None`): the subject's rare token; None or "" removes it, as CLIP-T needs.
        class_noun (`str`): the subject's class, e.g. "dog".

    Example:
        >>> format_prompt("a red {0} {1}", None, "backpack")
        'a red backpack'
    """
    # Removing the identifier leaves a double space ("a  dog"); collapse it so the text matches
    # what a person would write.
    return " ".join(template.format(identifier or "", class_noun).split())


def select_prompts(templates: list[str], max_prompts: int | None) -> list[str]:
    """At most `max_prompts` templates, evenly spread over the list so a quick run still mixes kinds.

    Example:
        >>> select_prompts(dreambench_prompts(live=False), 2)
        ['a {0} {1} in the jungle', 'a {0} {1} floating on top of water']
    """
    if max_prompts is None or max_prompts >= len(templates):
        return list(templates)
    if max_prompts < 1:
        raise InputError(f"max_prompts must be at least 1; got {max_prompts}.")
    step = len(templates) / max_prompts
    return [templates[int(i * step + 0.5)] for i in range(max_prompts)]


@cache
def _prompt_file(name: str) -> tuple[str, ...]:
    lines = _asset(name).splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@cache
def _subjects() -> tuple[tuple[str, Subject], ...]:
    rows = [line.split("\t") for line in _asset("subjects.tsv").splitlines()[1:] if line.strip()]
    return tuple((folder, Subject(folder, noun, kind == "live")) for folder, noun, kind in rows)


def _asset(name: str) -> str:
    return (resources.files("db_adapters") / "assets" / "dreambench" / name).read_text(encoding="utf-8")
