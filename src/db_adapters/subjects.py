"""The subjects of a run: what a user gives for each (`Subject`) and what the plan resolves for it.

One `personalize` run trains one subject or several into one adapter. Each subject gets its own
identifier (no two alike) and instance prompt; each class among them gets its own class images and
class prompt for the prior. With one subject, the run is the paper's; with several, the instance
half of every step draws from all subjects' photos and the prior half from all their classes' images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Subject:
    """One subject to personalize: its photos, its class noun and, optionally, its identifier.

    Attributes:
        images (`str | PathLike | list`): a folder, image paths, or PIL images of the subject (3-5).
        class_noun (`str`): the subject's coarse class, e.g. "dog".
        identifier (`str | None`): the rare token to bind; None lets the binder choose one that no other
            subject of the run has.
        instance_prompt (`str | None`): the subject images' prompt; None: "a {identifier} {class_noun}".
        class_images (`str | PathLike | list | None`): your own images of the class, topped up by generation.

    Example:
        >>> from db_adapters import Subject
        >>> Subject("photos/rex", "dog").class_noun
        'dog'
    """

    images: Any
    class_noun: str
    identifier: str | None = None
    instance_prompt: str | None = None
    class_images: Any = None


@dataclass(frozen=True)
class PlannedSubject:
    """One subject as the run trains it: images loaded, identifier chosen, prompts written."""

    images: list[Image.Image] = field(repr=False)
    class_noun: str
    identifier: str
    instance_prompt: str
    class_prompt: str
    class_images: list[Image.Image] = field(repr=False, default_factory=list)

    def binding(self) -> dict[str, str]:
        """What the adapter file records of this subject (JSON-able)."""
        return {
            "identifier": self.identifier,
            "class_noun": self.class_noun,
            "instance_prompt": self.instance_prompt,
            "class_prompt": self.class_prompt,
        }


def as_subjects(images: Any, class_noun: str | None, class_images: Any, settings: dict[str, Any]) -> list[Subject]:
    """The run's subjects from `personalize`'s arguments: one from (images, class_noun), or the `Subject`s given.

    With several subjects, the per-subject settings (identifier, instance_prompt, class_prompt) and
    `class_images` belong on each `Subject`; giving them for the run is an `InputError`.

    Example:
        >>> [s.class_noun for s in as_subjects([Subject("a", "dog"), Subject("b", "cat")], None, None, {})]
        ['dog', 'cat']
    """
    given = [images] if isinstance(images, Subject) else images
    if isinstance(given, Sequence) and not isinstance(given, str) and any(isinstance(s, Subject) for s in given):
        return _several(list(given), class_noun, class_images, settings)
    if class_noun is None:
        raise InputError(
            "class_noun is missing: personalize(pipe, images, class_noun) names the subject's class, e.g. 'dog' "
            "(or pass a list of db_adapters.Subject(images, class_noun) for several subjects)."
        )
    return [
        Subject(
            images,
            class_noun,
            identifier=settings.get("identifier"),
            instance_prompt=settings.get("instance_prompt"),
            class_images=class_images,
        )
    ]


def _several(subjects: list[Any], class_noun: str | None, class_images: Any, settings: dict[str, Any]) -> list[Subject]:
    odd = [f"images[{i}] is a {type(s).__name__}" for i, s in enumerate(subjects) if not isinstance(s, Subject)]
    if odd:
        raise InputError(f"{odd[0]}: a list of subjects holds db_adapters.Subject(images, class_noun) items only.")
    run_wide = [name for name in ("identifier", "instance_prompt", "class_prompt") if settings.get(name) is not None]
    if class_noun is not None or class_images is not None or run_wide:
        named = (["class_noun"] if class_noun is not None else []) + (["class_images"] if class_images else [])
        raise InputError(
            f"{', '.join(named + run_wide)} given for the whole run, but the run has {len(subjects)} subjects; give "
            "each Subject(images, class_noun, identifier=..., instance_prompt=..., class_images=...) its own."
        )
    identifiers = [s.identifier.strip() for s in subjects if s.identifier]
    repeated = sorted({i for i in identifiers if identifiers.count(i) > 1})
    if repeated:
        raise InputError(f"identifier {repeated[0]!r} is given to several subjects; each subject needs its own.")
    return subjects


def class_groups(subjects: Sequence[PlannedSubject]) -> dict[str, list[Image.Image]]:
    """Each class prompt of the run, with the class images the users gave for it (subjects of one class share).

    Example:
        >>> dog = PlannedSubject([], "dog", "ki", "a ki dog", "a dog")
        >>> list(class_groups([dog, dog]))
        ['a dog']
    """
    groups: dict[str, list[Image.Image]] = {}
    for subject in subjects:
        groups.setdefault(subject.class_prompt, []).extend(subject.class_images)
    return groups
