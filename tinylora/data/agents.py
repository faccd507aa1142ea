"""Who did it? A sentence classification task where word order decides the label.

Each sentence names two participants from different classes (a person, an animal, a
machine), one acting on the other:

    "the old farmer quietly pushed the red robot."         -> person   (active voice)
    "the red robot was quietly pushed by the old farmer."  -> person   (passive voice)
    "the old farmer was quietly pushed by the red robot."  -> machine

The label is the class of the one who acts (the agent). Both classes appear in every
sentence, so the words alone do not give the answer; the order of the nouns and the voice
("was ... by") do. Mean-pooled embeddings of a frozen sentence encoder keep mostly which
words occur, so a linear probe on them does little better than telling which two classes
are present (about 50-60%), while fine-tuning the encoder can learn the syntax.

Generated from fixed word lists with a seeded ``random.Random``: the same seed gives the
same sentences on every machine and Python version.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["AGENT_CLASSES", "TextClassificationData", "agent_task"]

AGENT_CLASSES = ("person", "animal", "machine")

_NOUNS = {
    "person": ("farmer", "teacher", "doctor", "pilot", "baker", "sailor", "nurse", "judge",
               "student", "painter"),
    "animal": ("dog", "horse", "goat", "fox", "parrot", "tiger", "rabbit", "bear", "donkey",
               "cat"),
    "machine": ("robot", "tractor", "drone", "crane", "truck", "forklift", "bulldozer",
                "scooter", "vacuum cleaner", "lawn mower"),
}
# (past tense) verbs that any of the three kinds can do to any other
_VERBS = ("pushed", "pulled", "followed", "chased", "watched", "bumped", "dragged", "blocked",
          "approached", "ignored", "lifted", "startled", "circled", "hit", "passed", "nudged")
_ADJECTIVES = ("old", "small", "red", "noisy", "tired", "quiet", "big", "new", "grey", "clumsy")
_ADVERBS = ("quietly", "suddenly", "slowly", "gently", "angrily", "again", "carefully")
_PLACES = ("near the barn", "in the yard", "on the road", "behind the shed", "at dawn",
           "in the rain", "by the river")


@dataclass
class TextClassificationData:
    """Sentences and integer labels, split into train and test (held out)."""
    classes: tuple
    train_texts: list
    train_labels: list
    test_texts: list
    test_labels: list

    def __repr__(self):
        return (f"TextClassificationData(classes={self.classes}, train={len(self.train_texts)}, "
                f"test={len(self.test_texts)})")


def _noun_phrase(rng: random.Random, kind: str) -> str:
    noun = rng.choice(_NOUNS[kind])
    return f"the {rng.choice(_ADJECTIVES)} {noun}" if rng.random() < 0.5 else f"the {noun}"


def _sentence(rng: random.Random, agent: str, patient: str) -> str:
    a, p = _noun_phrase(rng, agent), _noun_phrase(rng, patient)
    verb = rng.choice(_VERBS)
    adverb = rng.choice(_ADVERBS) + " " if rng.random() < 0.4 else ""
    place = " " + rng.choice(_PLACES) if rng.random() < 0.3 else ""
    if rng.random() < 0.5:
        s = f"{a} {adverb}{verb} {p}{place}"                 # active: agent first
    else:
        s = f"{p} was {adverb}{verb} by {a}{place}"          # passive: agent last
    return s[0].upper() + s[1:] + "."


def agent_task(n: int = 960, test_fraction: float = 0.25, seed: int = 0) -> TextClassificationData:
    """``n`` distinct sentences labelled with the agent's class (0 person, 1 animal, 2
    machine), balanced over the six (agent, patient) class pairs and both voices; the last
    ``test_fraction`` of a seeded shuffle is the held-out test split."""
    if n < 12:
        raise ValueError(f"agent_task: n must be at least 12 (two per class pair), got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"agent_task: test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    pairs = [(a, p) for a in range(3) for p in range(3) if a != p]
    seen, rows = set(), []
    i = 0
    while len(rows) < n:
        agent, patient = pairs[i % len(pairs)]
        i += 1
        text = _sentence(rng, AGENT_CLASSES[agent], AGENT_CLASSES[patient])
        if text in seen:   # a duplicate could sit in both splits
            continue
        seen.add(text)
        rows.append((text, agent))
        if i > 100 * n:
            raise RuntimeError("agent_task: could not draw enough distinct sentences")
    rng.shuffle(rows)
    n_test = max(1, round(n * test_fraction))
    train, test = rows[:-n_test], rows[-n_test:]
    return TextClassificationData(
        classes=AGENT_CLASSES,
        train_texts=[t for t, _ in train], train_labels=[y for _, y in train],
        test_texts=[t for t, _ in test], test_labels=[y for _, y in test])
