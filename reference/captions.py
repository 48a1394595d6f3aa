"""The caption grammar: every scene has many phrasings, all in distribution.

Synonyms ("crimson disc" for "red circle"), word-order variants ("top-left: a
red circle" / "a red circle in the top left") and optional size and
background phrases are drawn per caption, so training sees each scene under
many wordings and paraphrased prompts (issue #6's reuse test, H3) stay inside
what the model knows.  The canonical caption (``canonical_caption``) is the
one the demo and the evaluation use when they need a fixed wording.
"""
from __future__ import annotations

import random
import re

from .shapes import Scene, Shape

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "amber"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black", "dark"),
    "white": ("white", "light"),
    "gray": ("gray", "grey"),
}
# (prefix form "top-left:", phrase form "in the top left") per canonical position
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "top-left", "upper left"),
    "top": ("top", "top middle", "upper middle"),
    "top right": ("top right", "top-right", "upper right"),
    "left": ("left", "middle left", "left side"),
    "center": ("center", "centre", "middle"),
    "right": ("right", "middle right", "right side"),
    "bottom left": ("bottom left", "bottom-left", "lower left"),
    "bottom": ("bottom", "bottom middle", "lower middle"),
    "bottom right": ("bottom right", "bottom-right", "lower right"),
}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
EXTRA_WORDS = ("a", "an", "the", "in", "at", "on", "and", "with", "background", "corner", ":", ";", ",", "-")

_TOKEN_RE = re.compile(r"[a-z]+|[:;,\-]")


def words(text: str) -> list[str]:
    """The grammar's word split: lower-case words and the punctuation ``: ; , -`` as words.

    >>> words("Top-left: a Crimson disc")
    ['top', '-', 'left', ':', 'a', 'crimson', 'disc']
    """
    return _TOKEN_RE.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word the grammar can emit, after the special tokens (ids are list positions)."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    groups = (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, BACKGROUND_WORDS, POSITION_WORDS)
    phrases = [p for g in groups for options in g.values() for p in options] + list(EXTRA_WORDS)
    for phrase in phrases:
        for word in words(phrase):
            if word not in vocab:
                vocab.append(word)
    return vocab


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _object_phrase(obj: Shape, rng: random.Random | None) -> str:
    pick = (lambda options: options[0]) if rng is None else rng.choice
    colour = pick(COLOUR_WORDS[obj.colour])
    shape = pick(SHAPE_WORDS[obj.shape])
    parts = [colour, shape]
    if rng is not None and rng.random() < 0.35:
        parts.insert(0, pick(SIZE_WORDS[obj.size]))
    return f"{_article(parts[0])} {' '.join(parts)}"


def _where(obj: Shape, rng: random.Random | None) -> tuple[str, str]:
    """(prefix form, phrase form) for the object's position."""
    name = POSITION_WORDS[obj.position][0] if rng is None else rng.choice(POSITION_WORDS[obj.position])
    corner = " corner" if rng is not None and " " in obj.position and rng.random() < 0.3 else ""
    preposition = "on the" if obj.position in ("left", "right") and rng is not None and rng.random() < 0.5 else "in the"
    if obj.position == "center" and rng is not None and rng.random() < 0.5:
        preposition = "at the"
    return f"{name}:", f"{preposition} {name}{corner}"


def _clause(obj: Shape, rng: random.Random | None) -> str:
    prefix, phrase = _where(obj, rng)
    if rng is not None and rng.random() < 0.35:
        return f"{prefix} {_object_phrase(obj, rng)}"
    return f"{_object_phrase(obj, rng)} {phrase}"


def _background(scene: Scene, rng: random.Random | None) -> str:
    word = BACKGROUND_WORDS[scene.background][0] if rng is None else rng.choice(BACKGROUND_WORDS[scene.background])
    if rng is not None and rng.random() < 0.5:
        return f"on {word}"
    return f"on a {word} background"


def caption(scene: Scene, rng: random.Random) -> str:
    """One random phrasing of ``scene``; the background is mentioned about two times in three.

    >>> from .shapes import Scene, Shape
    >>> scene = Scene("white", (Shape("circle", "red", "top left"),))
    >>> text = caption(scene, random.Random(3))
    >>> any(w in words(text) for w in ("red", "crimson", "scarlet")), any(w in words(text) for w in ("circle", "disc", "dot"))
    (True, True)
    """
    clauses = [_clause(obj, rng) for obj in scene.objects]
    rng.shuffle(clauses)
    joiner = rng.choice((" and ", "; ", ", "))
    text = joiner.join(clauses)
    if rng.random() < 0.67:
        text = f"{text} {_background(scene, rng)}" if rng.random() < 0.7 else f"{_background(scene, rng)}, {text}"
    return text


def canonical_caption(scene: Scene) -> str:
    """The fixed wording: first synonyms, objects in scene order, background last.

    >>> from .shapes import Scene, Shape
    >>> canonical_caption(Scene("white", (Shape("circle", "red", "top left"), Shape("square", "blue", "right"))))
    'a red circle in the top left and a blue square in the right on a white background'
    """
    text = " and ".join(_clause_canonical(obj) for obj in scene.objects)
    return f"{text} {_background(scene, None)}"


def _clause_canonical(obj: Shape) -> str:
    return f"{_object_phrase(obj, None)} {_where(obj, None)[1]}"


def _phrase_table() -> list[tuple[list[str], str, str]]:
    """(word sequence, kind, canonical value), longest phrases first so "top middle" beats "top"."""
    table = []
    for kind, group in (("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS), ("size", SIZE_WORDS),
                        ("position", POSITION_WORDS)):
        for canonical, options in group.items():
            table.extend((words(option), kind, canonical) for option in options)
    return sorted(table, key=lambda row: -len(row[0]))


_BACKGROUND_RE = re.compile(r"\b(?:on|with) (?:an? )?(" + "|".join(
    w for options in BACKGROUND_WORDS.values() for w in options) + r")(?: background)?\b")


def parse_caption(text: str) -> dict[str, object]:
    """What a caption asks for: ``{"background": name or None, "objects": [{shape, colour, position}, ...]}``.

    Clauses are split at "and", ";" and ","; inside one, the first colour, shape
    and position phrases found belong to one object.  Attributes a clause does
    not name are ``None`` (and then not scored).

    >>> parse_caption("top-left: a crimson disc and a big blue box on the right side, on grey")
    {'background': 'gray', 'objects': [{'shape': 'circle', 'colour': 'red', 'position': 'top left'}, {'shape': 'square', 'colour': 'blue', 'position': 'right'}]}
    """
    text = text.lower()
    background = None
    match = _BACKGROUND_RE.search(text)
    if match:
        word = match.group(1)
        background = next(name for name, options in BACKGROUND_WORDS.items() if word in options)
        text = text[:match.start()] + text[match.end():]
    objects = []
    table = _phrase_table()
    for clause in re.split(r"\band\b|[;,]", text):
        tokens = words(clause)
        found: dict[str, str | None] = {"shape": None, "colour": None, "position": None}
        i = 0
        while i < len(tokens):
            for seq, kind, canonical in table:
                if tokens[i:i + len(seq)] == seq:
                    if kind in found and found[kind] is None:
                        found[kind] = canonical
                    i += len(seq)
                    break
            else:
                i += 1
        if found["shape"] or found["colour"]:
            objects.append(found)
    return {"background": background, "objects": objects}
