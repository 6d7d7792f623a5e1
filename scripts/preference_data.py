"""The shipped preference sets: recipe prompts with a faithful answer chosen and a
plausible but wrong one rejected (``data/preference``), and the same answers unpaired
for KTO (``data/kto``). Called by ``make_dataset.py``; deterministic like it.

A rejected answer is the chosen one made wrong in one way, rendered with the same random
choices (intro, tip), so the pair differs only in content. The ways are those of
make_dataset's degraded records, which a cook would notice:

* ``time``: a timing answer with the cooking time three or four times too long;
* ``order``: the recipe with its steps in a shuffled order, numbered as if right;
* ``ingredients``: the recipe with the ingredient list of another dish of its category;
* ``loop``: the faithful answer that does not stop, its last line repeated three to five
  times (the degenerate loop a small model falls into).

The base model was pre-trained on the faithful facts (``corpus/pretrain.txt``), so on
the first three kinds it already gives the faithful answer the higher log-probability
per token. A loop is the other way round: repeated lines are easy to predict, so per
token the base model prefers the looping answer (it does on about 5 loops in 6). Half
the pairs are loops, so a length-normalised objective (ORPO, SimPO) starts near chance
on validation, and rises only by learning the preference: an answer ends, it does not
loop. (Measured on the tiny model, base model, 40 pairs of each kind: the faithful answer
has the higher mean log-prob in 97% of ``order``, 70% of ``ingredients``, 17% of
``loop`` pairs.)
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

N_PAIRS_TRAIN, N_PAIRS_VALID, N_PAIRS_TEST = 400, 48, 48


def _other(dish, dishes: list, rng: random.Random, differs: Callable) -> object:
    """Another dish, of the same category where one differs in the swapped fact."""
    same = [d for d in dishes if d.category == dish.category and differs(d)]
    return rng.choice(same or [d for d in dishes if differs(d)])


def _render_pair(render: Callable, dish, wrong, rng: random.Random) -> tuple[str, str]:
    """(faithful, wrong) renderings drawing the same random choices."""
    state = rng.getstate()
    chosen = render(dish, rng)
    after = rng.getstate()
    rng.setstate(state)
    rejected = render(wrong, rng)
    rng.setstate(after)
    return chosen, rejected


def _shuffled_steps(dish, rng: random.Random):
    """The dish with its steps in another order (the first step never stays first)."""
    steps = list(dish.steps)
    while steps[0] == dish.steps[0]:
        rng.shuffle(steps)
    return replace(dish, steps=steps)


def _looping(answer: str, rng: random.Random) -> str:
    """The answer with its last non-empty line repeated three to five more times."""
    last = [line for line in answer.split("\n") if line.strip()][-1]
    return answer + "\n" + "\n".join([last] * rng.choice([3, 4, 5]))


def make_pair(dishes: list, rng: random.Random, m) -> dict:
    """One conversational preference record (TRL's prompt/chosen/rejected message lists).
    ``m`` is the make_dataset module: its knowledge base, prompts and renderers."""
    dish = rng.choice(dishes)
    kind = rng.choice(["time", "order", "ingredients", "loop", "loop", "loop"])
    if kind == "loop":
        if dish.time and rng.random() < 0.5:
            prompt = rng.choice(m.USER_TIME).format(d=dish.name, m=dish.method)
            chosen = m.timing_answer(dish, rng)
        else:
            prompt = rng.choice(m.USER_RECIPE).format(d=dish.name, a=m._article(dish.name))
            chosen = m.render_recipe(dish, rng)
        rejected = _looping(chosen, rng)
    elif kind == "time" and dish.time:
        prompt = rng.choice(m.USER_TIME).format(d=dish.name, m=dish.method)
        wrong = replace(dish, time=dish.time * rng.choice([3, 4]) + rng.choice([5, 10]))
        chosen, rejected = _render_pair(m.timing_answer, dish, wrong, rng)
    else:
        prompt = rng.choice(m.USER_RECIPE).format(d=dish.name, a=m._article(dish.name))
        if kind == "ingredients" or len(dish.steps) < 2:
            other = _other(dish, dishes, rng, lambda d: d.ingredients != dish.ingredients)
            wrong = replace(dish, ingredients=other.ingredients)
        else:
            wrong = _shuffled_steps(dish, rng)
        chosen, rejected = _render_pair(m.render_recipe, dish, wrong, rng)
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def unpaired(pairs: list[dict], rng: random.Random) -> list[dict]:
    """KTO's format: each pair gives one example, its chosen answer (label true) or its
    rejected one (false), alternating in random order so the labels stay balanced."""
    labels = [i % 2 == 0 for i in range(len(pairs))]
    rng.shuffle(labels)
    return [{"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"], "label": good}
            for p, good in zip(pairs, labels)]


def generate_preference(m, dishes: list, seed: int, write: Callable) -> dict:
    """Write data/preference/{split}.jsonl and data/kto/{split}.jsonl via ``write(rel,
    records)``; pairs are unique across splits. Returns {name: records}."""
    rng, seen, written = random.Random(seed), set(), {}
    for split, n in (("train", N_PAIRS_TRAIN), ("valid", N_PAIRS_VALID), ("test", N_PAIRS_TEST)):
        pairs = m._unique_records(lambda: _keyed(make_pair(dishes, rng, m)), n, seen)
        pairs = [{k: v for k, v in p.items() if k != "messages"} for p in pairs]
        written[f"preference/{split}"] = write(f"preference/{split}.jsonl", pairs)
        written[f"kto/{split}"] = write(f"kto/{split}.jsonl", unpaired(pairs, rng))
    return written


def _keyed(pair: dict) -> dict:
    # make_dataset's uniqueness check reads "messages": the prompt and both answers.
    return {**pair, "messages": pair["prompt"] + pair["chosen"] + pair["rejected"]}
