"""Trivia questions for `pdserve bench iccache`, and the statistics its report needs.

Questions come from the PyPI package `red-trivia` (GPLv3; installed by the `iccache-bench`
extra and read where it is installed, never copied into this repository) or from a directory of
YAML files in the same format (`question: [alias, ...]`; tests use one). Quality is alias-
normalised exact match: an answer is right when, lower-cased and stripped of punctuation,
articles and extra spaces, it equals one of the question's accepted answers."""
from __future__ import annotations

import math
import pathlib
import random
import re
import string
from dataclasses import dataclass

import yaml

# General-knowledge lists of red-trivia 1.1.1 (about 3,900 questions). Left out: lists about one
# video game, and lists whose questions are pictures (flags, maps).
DEFAULT_LISTS = ("general", "worldcapitals", "uscapitals", "artandliterature", "entertainment", "sports",
                 "disney", "harrypotter", "starwars", "2015", "2016")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Question:
    text: str
    aliases: tuple[str, ...]


def normalise(answer: str) -> str:
    return " ".join(_ARTICLES.sub(" ", answer.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, aliases: tuple[str, ...]) -> bool:
    got = normalise(answer)
    return bool(got) and any(got == normalise(a) for a in aliases)


def list_files(lists_dir: str | pathlib.Path | None, names: tuple[str, ...] | None) -> list[pathlib.Path]:
    if lists_dir is None:
        try:
            from redbot.ext.trivia import lists
        except ImportError as exc:
            raise SystemExit("bench iccache needs the trivia lists of the PyPI package red-trivia: "
                             "pip install -e '.[iccache-bench]' (or pass --lists-dir)") from exc
        files = list(lists())
    else:
        files = list(pathlib.Path(lists_dir).glob("*.yaml"))
    chosen = sorted(f for f in files if names is None or f.stem in names)
    if not chosen:
        raise SystemExit(f"no trivia lists named {names} in {lists_dir or 'red-trivia'}")
    return chosen


def load_questions(lists_dir: str | pathlib.Path | None = None,
                   names: tuple[str, ...] | None = DEFAULT_LISTS) -> list[Question]:
    """Every question once (by normalised text), with at least one accepted answer, in file order."""
    out: dict[str, Question] = {}
    for path in list_files(lists_dir, names):
        for text, answers in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).items():
            if text == "AUTHOR" or not isinstance(answers, list) or "http" in str(text):
                continue
            aliases = tuple(str(a) for a in answers if a is not None and normalise(str(a)))
            key = normalise(str(text))
            if aliases and key not in out:
                out[key] = Question(str(text).strip(), aliases)
    return list(out.values())


def split(questions: list[Question], num_held_out: int, num_train: int, num_pool: int, seed: int
          ) -> tuple[list[Question], list[Question], list[Question]]:
    """Held-out, train and example-pool questions: disjoint, from one seeded shuffle."""
    need = num_held_out + num_train + num_pool
    if len(questions) < need:
        raise SystemExit(f"{len(questions)} questions, {need} needed (held-out + train + pool)")
    order = questions[:]
    random.Random(seed).shuffle(order)
    return (order[:num_held_out], order[num_held_out:num_held_out + num_train],
            order[num_held_out + num_train:need])


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> dict:
    """Mean of a - b over the same questions, with a 95% normal interval on the paired
    differences; `significant` when the interval excludes zero."""
    if len(a) != len(b) or not a:
        raise ValueError("paired samples of equal, non-zero length needed")
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, n - 1))
    half = z * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)],
            "significant": not (mean - half <= 0 <= mean + half)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bootstrap_percentile(values: list[float], q: float, seed: int = 0, rounds: int = 1000) -> list[float]:
    """95% percentile-bootstrap interval of the q-quantile."""
    if not values:
        return [float("nan"), float("nan")]
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(percentile([values[rng.randrange(n)] for _ in range(n)], q) for _ in range(rounds))
    return [stats[int(0.025 * rounds)], stats[int(0.975 * rounds) - 1]]
