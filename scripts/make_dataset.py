#!/usr/bin/env python3
"""Generate mlx-tune's shipped toy domain: cooking recipes.

Everything the tests, the quickstart and the benchmarks train on comes out of
this one script, so it is fully deterministic: a single fixed-seed
``random.Random`` per output file, no hash-ordered containers, no clock, no
environment dependence.  Running it twice (or with ``--out`` pointing to a temp
dir) gives byte-identical files; ``tests/unit/models/test_tiny_asset.py`` checks that.

Design
------
A small *knowledge base* of dishes (ingredients, steps, cooking time, oven
temperature, doneness cue) is the single source of truth.  Two very different
renderings are made of it:

* ``corpus/pretrain.txt`` -- plain prose ("To make tomato soup you will need
  ...  First chop the onion, then ...").  The tiny base model is pre-trained on
  it, so it *knows* the dishes, quantities and times.  It never contains chat
  markup, bullet lists or numbered steps.
* ``recipes/{train,valid,test}.jsonl`` -- ChatML-style conversations whose
  assistant turns use a rigid structure (``Ingredients`` bullets, numbered
  ``Steps``).  Because the content is already familiar to the base model but
  the format (and the chat special tokens) are new, LoRA fine-tuning has a
  real, quickly learnable signal: the validation loss falls by well over half.

Records carry ``quality`` (0..1; degraded answers -- terse, wrong time,
missing steps -- score low so a quality filter has something to remove) and
``difficulty`` (1..3; correlates with answer length, number of steps and
turns).  A few detailed answers run to 400+ tokens so sequence truncation is
exercised.

``preference/{train,valid,test}.jsonl`` (prompt, chosen, rejected) and
``kto/{train,valid,test}.jsonl`` (prompt, completion, label) come from
``scripts/preference_data.py``: a faithful answer against one with a fact swapped.

Also written: tiny ``samples/completions`` ({"prompt","completion"}) and
``samples/text`` ({"text"}) datasets for tests of the other input formats.

Usage::

    python scripts/make_dataset.py              # writes ./data
    python scripts/make_dataset.py --out /tmp/d # same bytes, elsewhere
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preference_data  # noqa: E402  (scripts/preference_data.py: the preference sets)

SEED = 20240607

# Sizes of the shipped splits.
N_TRAIN, N_VALID, N_TEST = 1500, 150, 100
N_SAMPLES_TRAIN, N_SAMPLES_VALID = 64, 16
# Records are written in length-homogeneous groups of this size (see length_grouped).
GROUP = 8
# Target size of the pre-training corpus in characters (~1 MB keeps the
# tiny-model build within its time budget while covering every dish many times).
CORPUS_CHARS = 900_000

DEG = "\u00b0C"  # degree sign: exercises multi-byte characters in the byte-level BPE

# ---------------------------------------------------------------------------
# Knowledge base
# ---------------------------------------------------------------------------

# Units that read as "400 g of flour" rather than "2 eggs" in prose.
_MASS_UNITS = ("g", "kg", "ml", "litre", "litres", "tbsp", "tsp", "cup", "cups", "pinch",
               "cloves", "can", "cans", "handful", "slices", "sprigs", "bunch")


@dataclass(frozen=True)
class Ing:
    """One ingredient line: quantity (may be empty) and name."""

    qty: str
    name: str

    def as_list_item(self) -> str:
        return f"{self.qty} {self.name}".strip()

    def as_prose(self) -> str:
        if not self.qty:
            return self.name
        unit = self.qty.split()[-1]
        if unit in _MASS_UNITS:
            return f"{self.qty} of {self.name}"
        return f"{self.qty} {self.name}"


@dataclass(frozen=True)
class Step:
    """A cooking step plus an optional reason, used only in detailed answers."""

    text: str
    why: str = ""


@dataclass
class Dish:
    name: str
    category: str
    serves: int
    ingredients: list[Ing]
    steps: list[Step]
    time: int  # main cooking time in minutes
    method: str  # verb for timing questions: bake / simmer / roast / fry / cook
    doneness: str  # cue that it is done
    temp: int | None = None  # oven temperature in degrees C, if any
    meat: str | None = None  # ingredient name a vegetarian version replaces
    veg_swap: str = ""  # what replaces it
    tip: str = ""
    storage: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def _s(*pairs: str | tuple[str, str]) -> list[Step]:
    """Build steps from plain strings or (text, why) tuples."""
    out = []
    for p in pairs:
        out.append(Step(p[0], p[1]) if isinstance(p, tuple) else Step(p))
    return out


def _i(*items: tuple[str, str]) -> list[Ing]:
    return [Ing(q, n) for q, n in items]


def _soups() -> list[Dish]:
    # (name, main ingredients, simmer minutes, blend?, meat, veg swap)
    mains = [
        ("tomato soup", _i(("800 g", "ripe tomatoes"), ("1 tbsp", "tomato puree")), 25, True, None, ""),
        ("lentil soup", _i(("200 g", "red lentils"), ("2", "carrots"), ("1 tsp", "ground cumin")), 30, True, None, ""),
        ("pumpkin soup", _i(("1 kg", "pumpkin"), ("1 tsp", "ground nutmeg")), 25, True, None, ""),
        ("carrot and ginger soup", _i(("600 g", "carrots"), ("1 tbsp", "grated ginger")), 25, True, None, ""),
        ("mushroom soup", _i(("500 g", "mushrooms"), ("100 ml", "double cream")), 20, True, None, ""),
        ("leek and potato soup", _i(("3", "leeks"), ("500 g", "potatoes")), 25, True, None, ""),
        ("pea and mint soup", _i(("500 g", "frozen peas"), ("1 handful", "fresh mint")), 10, True, None, ""),
        ("chicken noodle soup", _i(("2", "chicken breasts"), ("100 g", "egg noodles"), ("2", "carrots")), 30, False,
         "chicken breasts", "a can of white beans"),
        ("minestrone", _i(("1 can", "chopped tomatoes"), ("100 g", "small pasta"), ("1", "courgette"),
                          ("1 can", "cannellini beans")), 30, False, None, ""),
        ("french onion soup", _i(("6", "large onions"), ("30 g", "butter"), ("4 slices", "toasted bread"),
                                 ("100 g", "gruyere cheese")), 45, False, None, ""),
    ]
    out = []
    for name, main, t, blend, meat, swap in mains:
        names = " and the ".join(i.name for i in main[:2])
        steps = _s(
            ("Chop the onion and crush the garlic.", "Small even pieces cook at the same speed."),
            "Heat the olive oil in a large pot over a medium heat.",
            ("Fry the onion for 5 minutes until soft, then add the garlic for 1 minute more.",
             "Soft onion gives the soup a sweet base."),
            f"Add the {names} and stir well.",
            "Pour in the stock and bring to the boil.",
            (f"Lower the heat and simmer for {t} minutes.", "A gentle simmer keeps the flavours clean."),
        )
        if blend:
            steps += _s(("Blend the soup until smooth.", "Let it cool for a few minutes first so it does not splash."))
        steps += _s("Season with salt and pepper and serve hot.")
        out.append(Dish(
            name=name, category="soup", serves=4,
            ingredients=_i(("1", "onion"), ("2 cloves", "garlic"), ("2 tbsp", "olive oil")) + main
            + _i(("1 litre", "vegetable stock"), ("", "salt and pepper")),
            steps=steps, time=t, method="simmer", doneness="the vegetables are completely tender",
            meat=meat, veg_swap=swap,
            tip="A spoon of yoghurt or a swirl of cream on top makes it richer.",
            storage="It keeps for 3 days in the fridge and freezes well for 3 months.",
            tags=("soup",),
        ))
    return out


def _stews() -> list[Dish]:
    mains = [
        ("beef stew", ("800 g", "stewing beef"), 120, "stewing beef", "mushrooms and lentils"),
        ("lamb stew", ("800 g", "diced lamb"), 100, "diced lamb", "chickpeas and aubergine"),
        ("chicken casserole", ("8", "chicken thighs"), 60, "chicken thighs", "butter beans"),
        ("chickpea stew", ("2 cans", "chickpeas"), 30, None, ""),
        ("bean chilli", ("2 cans", "kidney beans"), 40, None, ""),
        ("chilli con carne", ("500 g", "minced beef"), 45, "minced beef", "kidney beans and sweetcorn"),
        ("pork and apple stew", ("700 g", "diced pork"), 90, "diced pork", "butternut squash"),
    ]
    out = []
    for name, main, t, meat, swap in mains:
        has_meat = meat is not None
        steps = _s(
            ("Chop the onion, carrots and celery.", "This mix is the flavour base of most stews."),
        )
        if has_meat:
            steps += _s((f"Brown the {main[1]} in the oil in batches over a high heat.",
                         "Crowding the pan steams the meat instead of browning it."),
                        "Lift the meat out and set it aside.")
        steps += _s(
            "Soften the vegetables in the same pot for 8 minutes.",
            "Stir in the tomato puree and the paprika and cook for 1 minute.",
        )
        if has_meat:
            steps += _s("Return the meat to the pot.")
        else:
            steps += _s(f"Add the {main[1]}.")
        steps += _s(
            "Pour in the stock and the chopped tomatoes.",
            (f"Cover and simmer gently for {t} minutes, stirring now and then.",
             "Slow cooking makes tough cuts tender."),
            "Taste, season with salt and pepper, and serve with rice or bread.",
        )
        out.append(Dish(
            name=name, category="stew", serves=4 if t < 100 else 6,
            ingredients=_i(main, ("2 tbsp", "vegetable oil"), ("1", "onion"), ("2", "carrots"), ("2 sticks", "celery"),
                           ("2 tbsp", "tomato puree"), ("1 tsp", "smoked paprika"), ("1 can", "chopped tomatoes"),
                           ("500 ml", "beef stock" if has_meat else "vegetable stock"), ("", "salt and pepper")),
            steps=steps, time=t, method="simmer",
            doneness="the meat falls apart with a fork" if has_meat else "the sauce is thick",
            meat=meat, veg_swap=swap,
            tip="Stews taste even better the next day, once the flavours have settled.",
            storage="It keeps for 4 days in the fridge and freezes for 3 months.",
            tags=("stew",),
        ))
    return out


def _pastas() -> list[Dish]:
    out = [
        Dish("spaghetti bolognese", "pasta", 4,
             _i(("400 g", "spaghetti"), ("500 g", "minced beef"), ("1", "onion"), ("2 cloves", "garlic"),
                ("1 can", "chopped tomatoes"), ("2 tbsp", "tomato puree"), ("1 tsp", "dried oregano"),
                ("2 tbsp", "olive oil"), ("50 g", "parmesan")),
             _s("Chop the onion and garlic.",
                ("Fry the onion in the olive oil for 5 minutes, then add the garlic.", "This builds a sweet base."),
                ("Add the minced beef and brown it, breaking it up with a spoon.", "Browning adds deep flavour."),
                "Stir in the chopped tomatoes, tomato puree and oregano.",
                ("Simmer the sauce for 30 minutes.", "The sauce thickens and the flavours blend."),
                "Cook the spaghetti in salted boiling water for 10 minutes.",
                "Drain the pasta and toss it with the sauce.",
                "Serve with grated parmesan."),
             30, "simmer", "the sauce is thick and rich", None, "minced beef", "green lentils",
             "A splash of milk in the sauce makes it softer and rounder.",
             "The sauce keeps for 3 days in the fridge and freezes for 3 months.", ("pasta",)),
        Dish("penne arrabbiata", "pasta", 4,
             _i(("400 g", "penne"), ("1 can", "chopped tomatoes"), ("3 cloves", "garlic"), ("1 tsp", "chilli flakes"),
                ("3 tbsp", "olive oil"), ("1 handful", "fresh basil")),
             _s("Warm the olive oil in a pan and add the sliced garlic and chilli flakes.",
                ("Cook for 1 minute without letting the garlic brown.", "Burnt garlic turns bitter."),
                "Add the chopped tomatoes and simmer for 15 minutes.",
                "Cook the penne in salted boiling water for 11 minutes.",
                "Drain the pasta and stir it into the sauce.",
                "Tear over the basil and serve."),
             15, "simmer", "the sauce has thickened", None, None, "",
             "Add more chilli flakes if you like it hot.", "The sauce keeps for 3 days in the fridge.", ("pasta",)),
        Dish("spaghetti carbonara", "pasta", 2,
             _i(("200 g", "spaghetti"), ("100 g", "bacon"), ("2", "eggs"), ("50 g", "parmesan"), ("", "black pepper")),
             _s("Cook the spaghetti in salted boiling water for 10 minutes.",
                "Fry the bacon in a dry pan until crisp.",
                "Beat the eggs with the grated parmesan and plenty of black pepper.",
                ("Drain the pasta, keeping a cup of the cooking water.", "The starchy water makes the sauce silky."),
                ("Take the pan off the heat and toss the pasta with the bacon and the egg mixture.",
                 "Off the heat the eggs turn creamy instead of scrambling."),
                "Loosen with a little cooking water and serve at once."),
             10, "cook", "the sauce is creamy and coats the pasta", None, "bacon", "fried mushrooms",
             "Work quickly once the eggs go in.", "It is best eaten straight away.", ("pasta",)),
        Dish("pesto pasta", "pasta", 4,
             _i(("400 g", "fusilli"), ("50 g", "fresh basil"), ("30 g", "pine nuts"), ("1 clove", "garlic"),
                ("50 g", "parmesan"), ("100 ml", "olive oil")),
             _s("Toast the pine nuts in a dry pan for 3 minutes.",
                ("Blend the basil, pine nuts, garlic, parmesan and olive oil into a paste.",
                 "Fresh pesto is brighter than shop bought."),
                "Cook the fusilli in salted boiling water for 11 minutes.",
                "Drain the pasta and stir through the pesto.",
                "Serve warm or cold."),
             11, "cook", "the pasta is tender but still has a little bite", None, None, "",
             "Keep a little pasta water to loosen the pesto.", "Pesto keeps for a week in the fridge under oil.",
             ("pasta",)),
        Dish("macaroni cheese", "pasta", 4,
             _i(("300 g", "macaroni"), ("50 g", "butter"), ("50 g", "plain flour"), ("600 ml", "milk"),
                ("200 g", "cheddar"), ("1 tsp", "mustard")),
             _s("Heat the oven to 200" + DEG + ".",
                "Cook the macaroni in salted boiling water for 8 minutes and drain.",
                ("Melt the butter in a pan, stir in the flour and cook for 1 minute.", "Cooking the flour removes the raw taste."),
                ("Whisk in the milk a little at a time until you have a smooth sauce.", "Adding it slowly prevents lumps."),
                "Stir in most of the cheddar and the mustard.",
                "Mix the sauce with the macaroni and pour into a baking dish.",
                "Scatter over the rest of the cheese.",
                "Bake for 25 minutes."),
             25, "bake", "the top is golden and bubbling", 200, None, "",
             "A few breadcrumbs on top give it a crunch.", "It keeps for 2 days in the fridge.", ("pasta", "bake")),
        Dish("lasagne", "pasta", 6,
             _i(("12 sheets", "lasagne"), ("500 g", "minced beef"), ("1", "onion"), ("1 can", "chopped tomatoes"),
                ("50 g", "butter"), ("50 g", "plain flour"), ("600 ml", "milk"), ("100 g", "mozzarella"),
                ("50 g", "parmesan")),
             _s("Heat the oven to 180" + DEG + ".",
                "Fry the onion until soft, then brown the minced beef.",
                ("Add the chopped tomatoes and simmer for 20 minutes.", "A thick meat sauce stops the lasagne going watery."),
                "Make a white sauce with the butter, flour and milk.",
                ("Layer meat sauce, lasagne sheets and white sauce in a dish, three times.",
                 "Finish with white sauce so the top does not dry out."),
                "Top with the mozzarella and parmesan.",
                "Bake for 40 minutes.",
                ("Rest for 10 minutes before cutting.", "Resting lets the layers set.")),
             40, "bake", "it is golden and bubbling at the edges", 180, "minced beef", "roasted vegetables",
             "Make it a day ahead; it slices more neatly.", "It keeps for 3 days in the fridge and freezes well.",
             ("pasta", "bake")),
        Dish("tuna pasta bake", "pasta", 4,
             _i(("300 g", "penne"), ("2 cans", "tuna"), ("1 can", "sweetcorn"), ("500 ml", "white sauce"),
                ("100 g", "cheddar")),
             _s("Heat the oven to 200" + DEG + ".",
                "Cook the penne for 8 minutes and drain.",
                "Mix the pasta with the tuna, sweetcorn and white sauce.",
                "Tip into a baking dish and cover with the cheddar.",
                "Bake for 20 minutes."),
             20, "bake", "the cheese is melted and golden", 200, "tuna", "broccoli and peas",
             "Add a handful of spinach for colour.", "It keeps for 2 days in the fridge.", ("pasta", "bake")),
    ]
    return out


def _curries() -> list[Dish]:
    mains = [
        ("chicken curry", ("600 g", "chicken thighs"), 25, "chicken thighs", "chickpeas"),
        ("chickpea curry", ("2 cans", "chickpeas"), 20, None, ""),
        ("lentil dal", ("250 g", "red lentils"), 25, None, ""),
        ("vegetable curry", ("800 g", "mixed vegetables"), 25, None, ""),
        ("prawn curry", ("400 g", "raw prawns"), 8, "raw prawns", "cauliflower"),
        ("lamb curry", ("700 g", "diced lamb"), 75, "diced lamb", "potatoes and spinach"),
        ("butter chicken", ("600 g", "chicken breasts"), 20, "chicken breasts", "paneer"),
    ]
    out = []
    for name, main, t, meat, swap in mains:
        steps = _s(
            "Chop the onion and grate the garlic and ginger.",
            ("Fry the onion in the oil for 10 minutes until golden.", "Well browned onion gives a curry its depth."),
            "Add the garlic, ginger and curry paste and cook for 2 minutes.",
            (f"Add the {main[1]} and stir to coat in the spices.", "Coating in the spices seasons it all the way through."),
            "Pour in the coconut milk and the chopped tomatoes.",
            (f"Simmer for {t} minutes.", "Gentle heat keeps it tender."),
            "Stir in the spinach and the lime juice.",
            "Serve with rice and fresh coriander.",
        )
        out.append(Dish(
            name=name, category="curry", serves=4,
            ingredients=_i(main, ("1", "onion"), ("3 cloves", "garlic"), ("1 tbsp", "grated ginger"),
                           ("3 tbsp", "curry paste"), ("2 tbsp", "vegetable oil"), ("1 can", "coconut milk"),
                           ("1 can", "chopped tomatoes"), ("1 handful", "spinach"), ("1", "lime")),
            steps=steps, time=t, method="simmer",
            doneness="the sauce has thickened" if meat is None else f"the {main[1]} are cooked through",
            meat=meat, veg_swap=swap,
            tip="Toast whole spices in the oil first for an even better flavour.",
            storage="It keeps for 3 days in the fridge and freezes for 3 months.",
            tags=("curry",),
        ))
    return out


def _stir_fries() -> list[Dish]:
    mains = [
        ("chicken stir fry", ("2", "chicken breasts"), 6, "chicken breasts", "tofu"),
        ("beef stir fry", ("300 g", "beef steak"), 4, "beef steak", "tofu"),
        ("tofu stir fry", ("400 g", "firm tofu"), 8, None, ""),
        ("prawn stir fry", ("300 g", "raw prawns"), 3, "raw prawns", "cashew nuts"),
        ("vegetable noodles", ("200 g", "egg noodles"), 5, None, ""),
        ("egg fried rice", ("500 g", "cooked rice"), 5, None, ""),
    ]
    out = []
    for name, main, t, meat, swap in mains:
        steps = _s(
            ("Slice the peppers, spring onions and garlic thinly.", "Everything cooks fast, so prepare it all first."),
            ("Heat the oil in a wok over a very high heat.", "A hot wok sears instead of stewing."),
            (f"Stir fry the {main[1]} for {t} minutes.", ""),
            "Add the vegetables and stir fry for 3 minutes more.",
            "Pour in the soy sauce and the honey and toss well.",
            "Serve at once, topped with sesame seeds.",
        )
        out.append(Dish(
            name=name, category="stir fry", serves=2,
            ingredients=_i(main, ("2", "peppers"), ("4", "spring onions"), ("2 cloves", "garlic"),
                           ("1 tbsp", "vegetable oil"), ("3 tbsp", "soy sauce"), ("1 tbsp", "honey"),
                           ("1 tsp", "sesame seeds")),
            steps=steps, time=t + 3, method="stir fry", doneness="the vegetables are bright and just tender",
            meat=meat, veg_swap=swap, tip="Cut everything to the same size so it cooks evenly.",
            storage="It is best eaten straight away.", tags=("stir fry",),
        ))
    return out


def _salads() -> list[Dish]:
    out = [
        Dish("greek salad", "salad", 2,
             _i(("4", "tomatoes"), ("1", "cucumber"), ("1", "red onion"), ("200 g", "feta cheese"),
                ("1 handful", "black olives"), ("3 tbsp", "olive oil"), ("1 tsp", "dried oregano")),
             _s("Cut the tomatoes and cucumber into chunks.", "Slice the red onion thinly.",
                "Put everything in a bowl with the olives.", "Place the feta on top in one piece.",
                "Drizzle over the olive oil and sprinkle with oregano."),
             0, "prepare", "everything is dressed", None, None, "", "Use the ripest tomatoes you can find.",
             "It is best eaten the same day.", ("salad",)),
        Dish("potato salad", "salad", 4,
             _i(("750 g", "new potatoes"), ("4 tbsp", "mayonnaise"), ("2 tbsp", "yoghurt"), ("4", "spring onions"),
                ("1 tbsp", "chives")),
             _s(("Boil the potatoes for 15 minutes until tender.", "Start them in cold water so they cook evenly."),
                "Drain and leave to cool.", "Mix the mayonnaise and yoghurt.",
                "Slice the spring onions and chop the chives.", "Toss everything together and season."),
             15, "boil", "a knife slides easily into the potatoes", None, None, "",
             "Dress the potatoes while slightly warm so they soak up the flavour.",
             "It keeps for 2 days in the fridge.", ("salad",)),
        Dish("caesar salad", "salad", 2,
             _i(("1", "romaine lettuce"), ("2", "chicken breasts"), ("2 slices", "bread"), ("30 g", "parmesan"),
                ("3 tbsp", "caesar dressing")),
             _s("Cook the chicken breasts in a hot pan for 6 minutes each side.",
                "Cut the bread into cubes and fry until crisp.",
                "Tear the lettuce into a bowl.",
                "Slice the chicken and add it with the croutons.",
                "Toss with the dressing and shave over the parmesan."),
             12, "fry", "the chicken is cooked through", None, "chicken breasts", "a soft boiled egg",
             "Make the croutons from day old bread.", "Dress it just before serving.", ("salad",)),
        Dish("couscous salad", "salad", 4,
             _i(("250 g", "couscous"), ("300 ml", "boiling water"), ("1", "cucumber"), ("1", "red pepper"),
                ("1 handful", "fresh mint"), ("1", "lemon"), ("3 tbsp", "olive oil")),
             _s(("Pour the boiling water over the couscous, cover and leave for 5 minutes.", "It steams without cooking."),
                "Fluff it up with a fork.", "Dice the cucumber and pepper and chop the mint.",
                "Stir everything together with the lemon juice and olive oil."),
             5, "soak", "the grains are soft and fluffy", None, None, "", "Add feta or chickpeas to make it a meal.",
             "It keeps for 2 days in the fridge.", ("salad",)),
    ]
    return out


def _roasts() -> list[Dish]:
    out = [
        Dish("roast chicken", "roast", 4,
             _i(("1", "whole chicken"), ("1", "lemon"), ("30 g", "butter"), ("4 sprigs", "thyme"), ("", "salt and pepper")),
             _s("Heat the oven to 200" + DEG + ".",
                ("Take the chicken out of the fridge 30 minutes before cooking.", "It cooks more evenly from room temperature."),
                "Put the lemon and thyme inside the chicken.",
                "Rub the butter over the skin and season well.",
                "Roast for 80 minutes.",
                ("Rest for 15 minutes before carving.", "Resting keeps the meat juicy.")),
             80, "roast", "the juices run clear when you pierce the thigh", 200, None, "",
             "Roast it on a bed of onions to make a quick gravy.",
             "Leftovers keep for 3 days in the fridge.", ("roast",)),
        Dish("roast potatoes", "roast", 4,
             _i(("1 kg", "floury potatoes"), ("4 tbsp", "vegetable oil"), ("", "salt")),
             _s("Heat the oven to 220" + DEG + " with the oil in a roasting tin.",
                "Peel the potatoes and cut them into large chunks.",
                "Boil them for 8 minutes and drain.",
                ("Shake them in the pan to rough up the edges.", "Rough edges become the crispy bits."),
                "Tip them into the hot oil and turn to coat.",
                "Roast for 45 minutes, turning halfway."),
             45, "roast", "they are golden and crisp", 220, None, "",
             "Hot oil is the secret to crisp potatoes.", "They are best eaten straight away.", ("roast",)),
        Dish("roast vegetables", "roast", 4,
             _i(("2", "red onions"), ("2", "peppers"), ("2", "courgettes"), ("1", "aubergine"), ("3 tbsp", "olive oil"),
                ("1 tsp", "dried thyme")),
             _s("Heat the oven to 200" + DEG + ".", "Cut all the vegetables into even chunks.",
                "Toss them with the olive oil, thyme, salt and pepper.",
                ("Spread them out in a single layer on a tray.", "Crowded vegetables steam instead of roasting."),
                "Roast for 35 minutes."),
             35, "roast", "the edges are charred and the vegetables are soft", 200, None, "",
             "Add cherry tomatoes for the last 10 minutes.", "They keep for 3 days in the fridge.", ("roast",)),
        Dish("roast lamb", "roast", 6,
             _i(("2 kg", "leg of lamb"), ("4 cloves", "garlic"), ("3 sprigs", "rosemary"), ("2 tbsp", "olive oil")),
             _s("Heat the oven to 190" + DEG + ".", "Make small cuts in the lamb and push in the garlic and rosemary.",
                "Rub with the olive oil and season.", "Roast for 90 minutes.",
                ("Rest for 20 minutes before carving.", "The meat relaxes and stays juicy.")),
             90, "roast", "the meat is pink in the middle", 190, None, "", "Serve with mint sauce.",
             "Leftovers keep for 3 days in the fridge.", ("roast",)),
        Dish("roast pork", "roast", 6,
             _i(("1.5 kg", "pork shoulder"), ("1 tbsp", "fennel seeds"), ("2 tbsp", "olive oil"), ("", "sea salt")),
             _s("Heat the oven to 220" + DEG + ".",
                ("Dry the skin well and rub it with the oil and salt.", "Dry salty skin makes good crackling."),
                "Roast for 30 minutes at 220" + DEG + ".",
                "Turn the oven down to 170" + DEG + " and roast for 2 hours more.",
                "Rest for 20 minutes before carving."),
             150, "roast", "the crackling is crisp and the meat is tender", 170, None, "",
             "Serve with apple sauce.", "Leftovers keep for 3 days in the fridge.", ("roast",)),
    ]
    return out


def _risottos() -> list[Dish]:
    mains = [
        ("mushroom risotto", ("300 g", "mushrooms")),
        ("pea risotto", ("200 g", "frozen peas")),
        ("lemon risotto", ("1", "lemon")),
        ("pumpkin risotto", ("500 g", "pumpkin")),
    ]
    out = []
    for name, main in mains:
        steps = _s(
            "Warm the stock in a pan.",
            "Soften the chopped onion in the butter for 5 minutes.",
            ("Add the risotto rice and stir for 2 minutes.", "Toasting the rice helps it hold its shape."),
            f"Add the {main[1]}.",
            ("Add the stock a ladle at a time, stirring until each is absorbed.", "Stirring releases starch and makes it creamy."),
            "Keep going for about 20 minutes until the rice is tender.",
            "Stir in the parmesan and a knob of butter and rest for 2 minutes.",
        )
        out.append(Dish(
            name=name, category="risotto", serves=4,
            ingredients=_i(("300 g", "risotto rice"), main, ("1", "onion"), ("1 litre", "vegetable stock"),
                           ("40 g", "butter"), ("50 g", "parmesan")),
            steps=steps, time=20, method="cook", doneness="the rice is creamy but still has a little bite",
            tip="The risotto should flow slowly on the plate.", storage="It is best eaten straight away.",
            tags=("risotto",),
        ))
    return out


def _eggs() -> list[Dish]:
    return [
        Dish("omelette", "eggs", 1, _i(("3", "eggs"), ("10 g", "butter"), ("30 g", "grated cheese"), ("", "salt and pepper")),
             _s("Beat the eggs with a pinch of salt and pepper.", "Melt the butter in a small pan over a medium heat.",
                ("Pour in the eggs and stir gently for 30 seconds.", "Stirring early gives soft curds."),
                "Leave to set for 1 minute.", "Scatter over the cheese, fold in half and slide onto a plate."),
             2, "cook", "the egg is just set", None, None, "", "Fill it with ham, mushrooms or herbs.",
             "Eat it straight away.", ("eggs",)),
        Dish("scrambled eggs", "eggs", 2, _i(("4", "eggs"), ("20 g", "butter"), ("2 tbsp", "milk")),
             _s("Beat the eggs with the milk.", "Melt the butter in a pan over a low heat.",
                ("Add the eggs and stir slowly for 3 minutes.", "Low heat keeps them creamy."),
                "Take them off the heat while still slightly wet.", "Season and serve on toast."),
             3, "cook", "the eggs are soft and creamy", None, None, "", "Take them off the heat early; they keep cooking.",
             "Eat them straight away.", ("eggs",)),
        Dish("frittata", "eggs", 4, _i(("8", "eggs"), ("2", "potatoes"), ("1", "onion"), ("100 g", "spinach"),
                                       ("50 g", "feta cheese"), ("2 tbsp", "olive oil")),
             _s("Heat the oven to 180" + DEG + ".", "Boil the sliced potatoes for 6 minutes and drain.",
                "Fry the onion in the oil in an ovenproof pan, then add the potatoes and spinach.",
                "Pour over the beaten eggs and crumble in the feta.",
                ("Cook on the hob for 3 minutes, then bake for 15 minutes.", "The oven sets the top without burning the base.")),
             15, "bake", "the middle is set", 180, None, "", "It is just as good cold the next day.",
             "It keeps for 2 days in the fridge.", ("eggs", "bake")),
        Dish("shakshuka", "eggs", 2, _i(("4", "eggs"), ("1 can", "chopped tomatoes"), ("1", "red pepper"), ("1", "onion"),
                                       ("1 tsp", "ground cumin"), ("1 tsp", "smoked paprika"), ("2 tbsp", "olive oil")),
             _s("Fry the onion and pepper in the oil for 8 minutes.", "Add the cumin and paprika and cook for 1 minute.",
                "Pour in the tomatoes and simmer for 10 minutes.",
                ("Make four hollows and crack an egg into each.", "The sauce cradles the eggs as they poach."),
                "Cover and cook for 6 minutes.", "Serve with bread."),
             16, "simmer", "the whites are set and the yolks still runny", None, None, "", "Add crumbled feta at the end.",
             "Eat it straight away.", ("eggs",)),
    ]


def _breads() -> list[Dish]:
    out = []
    for name, flour, extra, t, temp in [
        ("white bread", "strong white flour", ("2 tbsp", "olive oil"), 30, 220),
        ("wholemeal bread", "wholemeal flour", ("1 tbsp", "honey"), 35, 220),
        ("focaccia", "strong white flour", ("6 tbsp", "olive oil"), 25, 220),
        ("pizza dough", "strong white flour", ("2 tbsp", "olive oil"), 12, 240),
    ]:
        steps = _s(
            f"Mix the {flour}, yeast and salt in a large bowl.",
            f"Add the warm water and the {extra[1]} and mix to a dough.",
            ("Knead for 10 minutes until smooth and stretchy.", "Kneading builds the gluten that traps the air."),
            ("Cover and leave to rise for 1 hour until doubled.", "A warm spot speeds up the rise."),
            "Knock back the dough and shape it.",
            "Leave to prove for 30 minutes more.",
            f"Bake at {temp}" + DEG + f" for {t} minutes.",
        )
        out.append(Dish(
            name=name, category="bread", serves=8,
            ingredients=_i(("500 g", flour), ("7 g", "dried yeast"), ("1 tsp", "salt"), ("300 ml", "warm water"), extra),
            steps=steps, time=t, method="bake", doneness="it sounds hollow when tapped underneath" if t > 15 else "the crust is golden",
            temp=temp, tip="Put a tray of water in the oven for a crisper crust.",
            storage="It keeps for 3 days in a bread bin and freezes well.", tags=("bread", "bake"),
        ))
    out.append(Dish(
        "soda bread", "bread", 8,
        _i(("500 g", "plain flour"), ("1 tsp", "bicarbonate of soda"), ("1 tsp", "salt"), ("400 ml", "buttermilk")),
        _s("Heat the oven to 200" + DEG + ".", "Mix the flour, bicarbonate of soda and salt.",
           ("Stir in the buttermilk quickly to a soft dough.", "Overmixing makes it tough."),
           "Shape into a round and cut a deep cross on top.", "Bake for 35 minutes."),
        35, "bake", "it sounds hollow when tapped underneath", 200, None, "", "No yeast and no rising time needed.",
        "It is best eaten the same day.", ("bread", "bake")))
    return out


def _cakes() -> list[Dish]:
    out = []
    for name, extra, t, temp, serves in [
        ("chocolate cake", _i(("50 g", "cocoa powder"), ("100 ml", "milk")), 30, 180, 10),
        ("lemon drizzle cake", _i(("2", "lemons"), ("100 g", "icing sugar")), 45, 180, 8),
        ("carrot cake", _i(("300 g", "grated carrots"), ("1 tsp", "ground cinnamon"), ("100 g", "walnuts")), 40, 180, 10),
        ("victoria sponge", _i(("4 tbsp", "jam"), ("150 ml", "double cream")), 25, 180, 8),
        ("banana bread", _i(("3", "ripe bananas"), ("1 tsp", "baking powder")), 55, 170, 8),
    ]:
        steps = _s(
            "Heat the oven to " + str(temp) + DEG + " and line a tin with baking paper.",
            ("Beat the butter and sugar together until pale and fluffy.", "This traps air and makes the cake light."),
            ("Beat in the eggs one at a time.", "Adding them slowly stops the mixture curdling."),
            "Fold in the flour with the " + " and the ".join(i.name for i in extra[:2]) + ".",
            "Spoon the mixture into the tin and smooth the top.",
            f"Bake for {t} minutes.",
            ("Leave to cool in the tin for 10 minutes, then turn out.", "A warm cake is fragile."),
        )
        out.append(Dish(
            name=name, category="cake", serves=serves,
            ingredients=_i(("200 g", "butter"), ("200 g", "caster sugar"), ("4", "eggs"), ("200 g", "self raising flour"))
            + extra,
            steps=steps, time=t, method="bake", doneness="a skewer comes out clean", temp=temp,
            tip="Weigh everything; baking needs accuracy.",
            storage="It keeps for 4 days in a tin.", tags=("cake", "bake"),
        ))
    return out


def _small_bakes() -> list[Dish]:
    return [
        Dish("chocolate chip cookies", "biscuits", 20,
             _i(("125 g", "butter"), ("100 g", "brown sugar"), ("1", "egg"), ("200 g", "plain flour"),
                ("150 g", "chocolate chips")),
             _s("Heat the oven to 180" + DEG + ".", "Beat the butter and sugar, then the egg.",
                "Stir in the flour and chocolate chips.", "Roll into balls and space them well apart on a tray.",
                ("Bake for 12 minutes.", "They firm up as they cool, so take them out while still soft.")),
             12, "bake", "the edges are golden but the middle is soft", 180, None, "",
             "Chill the dough for thicker cookies.", "They keep for 5 days in a tin.", ("biscuits", "bake")),
        Dish("oat cookies", "biscuits", 16,
             _i(("100 g", "butter"), ("100 g", "brown sugar"), ("2 tbsp", "golden syrup"), ("150 g", "rolled oats"),
                ("75 g", "plain flour")),
             _s("Heat the oven to 180" + DEG + ".", "Melt the butter, sugar and syrup together.",
                "Stir in the oats and flour.", "Drop spoonfuls onto a lined tray.", "Bake for 14 minutes."),
             14, "bake", "they are golden", 180, None, "", "Add raisins for a classic twist.",
             "They keep for a week in a tin.", ("biscuits", "bake")),
        Dish("blueberry muffins", "biscuits", 12,
             _i(("250 g", "plain flour"), ("2 tsp", "baking powder"), ("100 g", "caster sugar"), ("2", "eggs"),
                ("200 ml", "milk"), ("80 ml", "vegetable oil"), ("150 g", "blueberries")),
             _s("Heat the oven to 200" + DEG + " and line a muffin tin.", "Mix the dry ingredients in one bowl.",
                "Whisk the eggs, milk and oil in another.",
                ("Stir the wet into the dry until only just combined.", "Lumpy batter makes lighter muffins."),
                "Fold in the blueberries and fill the cases.", "Bake for 22 minutes."),
             22, "bake", "they are risen and spring back when pressed", 200, None, "",
             "Toss the berries in flour so they do not sink.", "They keep for 2 days in a tin.", ("biscuits", "bake")),
        Dish("shortbread", "biscuits", 12,
             _i(("250 g", "plain flour"), ("175 g", "butter"), ("75 g", "caster sugar")),
             _s("Heat the oven to 160" + DEG + ".", "Rub the butter into the flour and sugar.",
                "Press into a tin and prick all over with a fork.", "Bake for 35 minutes.",
                "Cut into fingers while still warm."),
             35, "bake", "it is pale golden", 160, None, "", "Use cold butter for the best texture.",
             "It keeps for 2 weeks in a tin.", ("biscuits", "bake")),
        Dish("chocolate brownies", "biscuits", 16,
             _i(("200 g", "dark chocolate"), ("175 g", "butter"), ("250 g", "caster sugar"), ("3", "eggs"),
                ("100 g", "plain flour")),
             _s("Heat the oven to 180" + DEG + " and line a square tin.", "Melt the chocolate and butter together.",
                "Whisk the eggs and sugar until thick.", "Fold in the chocolate, then the flour.",
                ("Bake for 25 minutes.", "A slight wobble in the middle means a fudgy brownie.")),
             25, "bake", "the top is crackly and the middle just set", 180, None, "",
             "Let them cool completely before cutting.", "They keep for 4 days in a tin.", ("biscuits", "bake")),
    ]


def _breakfasts_and_fish() -> list[Dish]:
    return [
        Dish("pancakes", "pancakes", 4, _i(("200 g", "plain flour"), ("2", "eggs"), ("300 ml", "milk"), ("1 tbsp", "butter")),
             _s("Whisk the flour, eggs and milk into a smooth batter.",
                ("Rest the batter for 10 minutes.", "Resting makes the pancakes more tender."),
                "Heat a little butter in a frying pan.", "Pour in a ladle of batter and swirl it around.",
                "Cook for 1 minute on each side."),
             2, "fry", "each side is golden", None, None, "", "Serve with lemon and sugar.",
             "The batter keeps for a day in the fridge.", ("pancakes",)),
        Dish("american pancakes", "pancakes", 4,
             _i(("200 g", "self raising flour"), ("1 tsp", "baking powder"), ("1", "egg"), ("250 ml", "milk"),
                ("1 tbsp", "caster sugar")),
             _s("Mix the flour, baking powder and sugar.", "Whisk in the egg and milk to a thick batter.",
                "Drop spoonfuls into a hot oiled pan.",
                ("Flip when bubbles appear on top, after about 2 minutes.", "The bubbles show the base has set."),
                "Cook for 1 minute more and serve with maple syrup."),
             3, "fry", "they are risen and golden", None, None, "", "Add blueberries to the batter.",
             "Eat them warm.", ("pancakes",)),
        Dish("waffles", "pancakes", 4,
             _i(("250 g", "plain flour"), ("2 tsp", "baking powder"), ("2", "eggs"), ("400 ml", "milk"), ("75 g", "melted butter")),
             _s("Heat the waffle iron.", "Whisk everything into a smooth batter.",
                "Pour batter into the iron and close it.", "Cook for 4 minutes.", "Serve with fruit and cream."),
             4, "cook", "they are crisp and golden", None, None, "", "Keep them warm in a low oven.",
             "They freeze well and reheat in the toaster.", ("pancakes",)),
        Dish("baked salmon", "fish", 2, _i(("2", "salmon fillets"), ("1", "lemon"), ("1 tbsp", "olive oil"), ("1 tbsp", "fresh dill")),
             _s("Heat the oven to 200" + DEG + ".", "Put the salmon on a lined tray.",
                "Drizzle with oil and lemon juice and scatter over the dill.",
                ("Bake for 12 minutes.", "Salmon turns dry if overcooked.")),
             12, "bake", "the fish flakes easily", 200, None, "", "Serve with new potatoes and greens.",
             "Leftovers keep for 2 days in the fridge.", ("fish",)),
        Dish("fish cakes", "fish", 4,
             _i(("500 g", "potatoes"), ("300 g", "white fish"), ("1", "egg"), ("50 g", "breadcrumbs"), ("1 tbsp", "parsley")),
             _s("Boil the potatoes until soft and mash them.", "Poach the fish for 8 minutes and flake it.",
                "Mix the fish, potato and parsley and shape into cakes.",
                ("Chill for 30 minutes.", "Cold fish cakes hold together in the pan."),
                "Dip in egg, then breadcrumbs.", "Fry for 4 minutes on each side."),
             8, "fry", "they are golden and hot through", None, None, "", "Serve with tartare sauce.",
             "Uncooked fish cakes freeze well.", ("fish",)),
        Dish("fish pie", "fish", 6,
             _i(("600 g", "mixed fish"), ("1 kg", "potatoes"), ("500 ml", "milk"), ("50 g", "butter"), ("50 g", "plain flour"),
                ("100 g", "frozen peas")),
             _s("Heat the oven to 200" + DEG + ".", "Boil and mash the potatoes with half the butter.",
                "Poach the fish in the milk for 5 minutes, then lift it out.",
                "Make a sauce with the rest of the butter, the flour and the poaching milk.",
                "Put the fish and peas in a dish and pour over the sauce.", "Top with the mash.", "Bake for 30 minutes."),
             30, "bake", "the top is golden and the filling bubbling", 200, None, "", "Add prawns for a treat.",
             "It keeps for 2 days in the fridge.", ("fish", "bake")),
        Dish("grilled trout", "fish", 2, _i(("2", "trout fillets"), ("20 g", "butter"), ("30 g", "flaked almonds"), ("1", "lemon")),
             _s("Heat the grill to high.", "Put the trout skin side up on a tray.",
                "Grill for 6 minutes until the skin crisps.", "Melt the butter and toast the almonds in it.",
                "Pour over the fish with a squeeze of lemon."),
             6, "grill", "the flesh is opaque", None, None, "", "Serve with green beans.",
             "Eat it straight away.", ("fish",)),
    ]


def build_dishes() -> list[Dish]:
    """Return the knowledge base, in a fixed order."""
    return (_soups() + _stews() + _pastas() + _curries() + _stir_fries() + _salads() + _roasts()
            + _risottos() + _eggs() + _breads() + _cakes() + _small_bakes() + _breakfasts_and_fish())


# Substitutions: (missing ingredient, replacement, how to use it, categories it applies to).
SUBSTITUTIONS = [
    ("butter", "olive oil", "Use three quarters of the amount. It works in savoury dishes but the flavour changes in cakes.",
     ("soup", "pasta", "risotto", "eggs", "fish", "roast")),
    ("butter", "margarine", "Swap it gram for gram. It gives a slightly softer texture.",
     ("cake", "biscuits", "pancakes", "pasta", "fish")),
    ("eggs", "mashed banana", "Use half a banana for each egg. It makes the bake denser and sweeter.",
     ("cake", "biscuits", "pancakes")),
    ("milk", "oat milk", "Swap it in the same amount. It is a little sweeter.",
     ("cake", "biscuits", "pancakes", "pasta", "eggs", "fish")),
    ("double cream", "greek yoghurt", "Stir it in off the heat so it does not split.",
     ("soup", "pasta", "cake", "curry")),
    ("vegetable stock", "water and a pinch of salt", "Add a spoon of soy sauce for extra depth.",
     ("soup", "risotto", "stew")),
    ("beef stock", "vegetable stock", "Add a spoon of tomato puree to make it richer.", ("stew",)),
    ("parmesan", "mature cheddar", "Use a little less, as it is saltier and softer.", ("pasta", "risotto")),
    ("self raising flour", "plain flour and baking powder", "Add 2 tsp of baking powder for every 150 g of flour.",
     ("cake", "pancakes")),
    ("caster sugar", "granulated sugar", "Blitz it in a blender for a few seconds first so it dissolves.",
     ("cake", "biscuits", "pancakes")),
    ("coconut milk", "natural yoghurt", "Stir it in at the end over a low heat so it does not split.", ("curry",)),
    ("curry paste", "2 tsp of curry powder and a little extra garlic", "Fry the powder in the oil for a minute first.",
     ("curry",)),
    ("soy sauce", "a pinch of salt and a little honey", "The dish will be less savoury but still good.", ("stir fry",)),
    ("fresh basil", "dried oregano", "Use a teaspoon of dried for a handful of fresh.", ("pasta",)),
    ("risotto rice", "pudding rice", "It works in a pinch but goes softer, so cook it 3 minutes less.", ("risotto",)),
    ("dried yeast", "fresh yeast", "Use twice the weight and crumble it into the warm water.", ("bread",)),
    ("lemon", "lime", "Use the same amount; it is slightly more sour.", ("fish", "roast", "cake", "salad")),
    ("feta cheese", "goat's cheese", "Crumble it in the same way.", ("salad", "eggs")),
    ("olive oil", "vegetable oil", "Swap it in the same amount; the taste is milder.",
     ("soup", "salad", "roast", "pasta", "eggs", "fish")),
]

# Extra sections that only the detailed (long) answers carry.
EQUIPMENT = {
    "soup": ["a large pot with a lid", "a sharp knife and a chopping board", "a wooden spoon", "a stick blender"],
    "stew": ["a heavy casserole dish with a lid", "a sharp knife and a chopping board", "a wooden spoon"],
    "pasta": ["a large pan for the pasta", "a frying pan or saucepan for the sauce", "a colander"],
    "curry": ["a large deep pan", "a grater for the garlic and ginger", "a wooden spoon"],
    "stir fry": ["a wok or a large frying pan", "a sharp knife", "a heatproof spatula"],
    "salad": ["a large bowl", "a sharp knife and a chopping board"],
    "roast": ["a roasting tin", "a meat thermometer if you have one", "a board for carving"],
    "risotto": ["a wide heavy pan", "a second pan for the stock", "a ladle and a wooden spoon"],
    "eggs": ["a non stick pan", "a bowl and a fork or whisk", "a spatula"],
    "bread": ["a large mixing bowl", "a baking tray or loaf tin", "a clean tea towel"],
    "cake": ["a cake tin and baking paper", "a mixing bowl", "an electric whisk or wooden spoon", "a skewer"],
    "biscuits": ["two baking trays and baking paper", "a mixing bowl", "a wire rack"],
    "pancakes": ["a frying pan or waffle iron", "a jug for the batter", "a whisk"],
    "fish": ["a baking tray or frying pan", "a fish slice", "baking paper"],
}
BEFORE_START = {
    "soup": "Chop all the vegetables before you turn on the heat, and warm the stock so the soup comes back to the boil quickly.",
    "stew": "Pat the meat dry with kitchen paper so it browns well, and give yourself plenty of time; a stew cannot be rushed.",
    "pasta": "Put a big pan of water on to boil first and salt it well, so the pasta is ready at the same time as the sauce.",
    "curry": "Measure out the spices and open the cans first, because things move quickly once the onions are golden.",
    "stir fry": "Cut every ingredient before you heat the wok; the cooking only takes a few minutes and there is no time to chop.",
    "salad": "Use the freshest vegetables you can find and dry any leaves well so the dressing clings to them.",
    "roast": "Take the meat or vegetables out of the fridge half an hour early and heat the oven fully before anything goes in.",
    "risotto": "Keep the stock hot on the next ring and stay by the pan; risotto needs about 20 minutes of gentle stirring.",
    "eggs": "Use the freshest eggs you have and keep the heat moderate; eggs turn rubbery when cooked too hard.",
    "bread": "Check that the yeast is in date and the water is warm, not hot, as hot water kills the yeast.",
    "cake": "Have the butter and eggs at room temperature and weigh everything before you start mixing.",
    "biscuits": "Line the trays before you start and leave space between each one, because they spread in the oven.",
    "pancakes": "Make the batter first and let it rest while the pan heats up.",
    "fish": "Check the fish for bones with your fingers and pat it dry before cooking.",
}
SERVING = {
    "soup": "Serve in warm bowls with crusty bread and butter.",
    "stew": "Serve with mashed potatoes, rice or crusty bread to soak up the sauce.",
    "pasta": "Serve straight away in warm bowls with a green salad on the side.",
    "curry": "Serve with basmati rice, naan bread and a spoon of yoghurt.",
    "stir fry": "Serve on its own or over plain rice or noodles.",
    "salad": "Serve as a side dish or with bread as a light lunch.",
    "roast": "Serve with gravy, roast potatoes and seasonal greens.",
    "risotto": "Serve in warm shallow bowls with extra parmesan.",
    "eggs": "Serve with hot buttered toast.",
    "bread": "Serve warm with butter, or use it for sandwiches and toast.",
    "cake": "Serve in slices with a cup of tea.",
    "biscuits": "Serve with a glass of cold milk or a hot drink.",
    "pancakes": "Serve with fruit, syrup or lemon and sugar.",
    "fish": "Serve with new potatoes, a green salad and a wedge of lemon.",
}

SYSTEM_PROMPTS = [
    "You are a helpful cooking assistant.",
    "You are a friendly chef. Give clear recipes with ingredients and numbered steps.",
    "You are a kitchen assistant. Answer cooking questions accurately and briefly.",
    "You help home cooks. Be clear and practical.",
]

# ---------------------------------------------------------------------------
# Chat rendering
# ---------------------------------------------------------------------------


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _low(s: str) -> str:
    return s[:1].lower() + s[1:]


def _article(name: str) -> str:
    return "an" if name[:1] in "aeiou" else "a"


def _uses_ing(dish: Dish, name: str) -> bool:
    return any(name == i.name or i.name.endswith(" " + name) for i in dish.ingredients)


def render_recipe(dish: Dish, rng: random.Random, detailed: bool = False) -> str:
    """Structured recipe: intro, Ingredients bullets, numbered Steps, tip."""
    intro = rng.choice([
        f"Here is a simple recipe for {dish.name}.",
        f"This {dish.name} serves {dish.serves}.",
        f"Here is how to make {dish.name}. It serves {dish.serves}.",
        f"Sure. This is a classic {dish.name}.",
    ])
    lines = [intro, "", f"Ingredients (serves {dish.serves}):"]
    lines += [f"- {i.as_list_item()}" for i in dish.ingredients]
    lines += ["", "Steps:"]
    for n, st in enumerate(dish.steps, 1):
        text = st.text
        if detailed and st.why:
            text = f"{text} {st.why}"
        lines.append(f"{n}. {text}")
    if detailed:
        lines += ["", "Equipment:"] + [f"- {e}" for e in EQUIPMENT[dish.category]]
        lines += ["", f"Before you start: {BEFORE_START[dish.category]}"]
        lines += ["", f"How to tell it is done: {dish.doneness}."]
        lines += [f"Tip: {dish.tip}", f"Storage: {dish.storage}"]
        if dish.meat:
            lines.append(f"Vegetarian version: use {dish.veg_swap} instead of the {dish.meat}.")
        subs = [s for s in SUBSTITUTIONS if dish.category in s[3] and _uses_ing(dish, s[0])]
        for miss, repl, how, _ in subs[:3]:
            lines.append(f"No {miss}? Use {repl}. {how}")
        lines.append(f"Serving: {SERVING[dish.category]}")
    elif dish.tip and rng.random() < 0.6:
        lines += ["", f"Tip: {dish.tip}"]
    return "\n".join(lines)


def timing_answer(dish: Dish, rng: random.Random) -> str:
    if dish.time == 0:
        return f"There is no cooking: {dish.name} is ready as soon as {dish.doneness}. It takes about 10 minutes to prepare."
    where = f" at {dish.temp}{DEG}" if dish.temp else ""
    return rng.choice([
        f"{_cap(dish.method)} the {dish.name}{where} for {dish.time} minutes, until {dish.doneness}.",
        f"It needs {dish.time} minutes{where}. It is ready when {dish.doneness}.",
        f"About {dish.time} minutes{where}. Check that {dish.doneness}.",
    ])


def substitution_answer(dish: Dish, sub: tuple, rng: random.Random) -> str:
    miss, repl, how, _ = sub
    return rng.choice([
        f"You can use {repl} instead of {miss} in {dish.name}. {how}",
        f"Use {repl}. {how}",
        f"{_cap(repl)} works well in place of {miss}. {how}",
    ])


_PLURAL_UNITS = {"can": "cans", "clove": "cloves", "handful": "handfuls", "litre": "litres", "cup": "cups",
                 "stick": "sticks", "slice": "slices", "sprig": "sprigs", "sheet": "sheets"}


def _double(ing: Ing) -> Ing:
    """Twice the quantity, keeping the English plural right ('2 cans', '2 onions')."""
    parts = ing.qty.split(" ", 1)
    if not parts[0].replace(".", "", 1).isdigit():
        return ing
    n = float(parts[0]) * 2
    num = str(int(n)) if n == int(n) else str(n)
    if len(parts) == 2:
        return Ing(f"{num} {_PLURAL_UNITS.get(parts[1], parts[1])}", ing.name)
    name = ing.name if ing.name.endswith("s") or parts[0] != "1" else ing.name + "s"
    return Ing(num, name)


def variation_answer(dish: Dish, kind: str, rng: random.Random) -> str:
    """Answer to 'make it vegetarian / spicy / for a crowd', as a short structured recipe delta."""
    if kind == "vegetarian":
        lines = [f"Yes. Replace the {dish.meat} with {dish.veg_swap}.", ""]
        lines.append("Changes:")
        lines.append(f"1. Leave out the {dish.meat}.")
        lines.append(f"2. Add the {dish.veg_swap} at the point where the {dish.meat} would go in.")
        if any("beef stock" == i.name for i in dish.ingredients):
            lines.append("3. Use vegetable stock instead of beef stock.")
            lines.append(f"4. Cook for {max(dish.time // 2, 10)} minutes, as vegetables need less time.")
        else:
            lines.append(f"3. Cook for {max(dish.time // 2, 5) if dish.time else 0} minutes less if the vegetables are soft.")
        return "\n".join(lines)
    if kind == "double":
        lines = [f"To serve {dish.serves * 2}, double everything:", "", "Ingredients:"]
        for i in dish.ingredients:
            lines.append(f"- {_double(i).as_list_item()}")
        lines += ["", "The steps stay the same. Use a bigger pan" + (
            f" and add 10 minutes to the {dish.time} minutes of cooking." if dish.time >= 20 else ".")]
        return "\n".join(lines)
    # spicy
    return "\n".join([
        f"Yes, {dish.name} takes heat well.", "", "Changes:",
        "1. Add 1 tsp of chilli flakes with the first ingredients.",
        "2. Add a sliced fresh chilli halfway through cooking.",
        "3. Taste at the end and add more if you like.",
    ])


USER_RECIPE = [
    "How do I make {d}?", "Can you give me a recipe for {d}?", "What is a good recipe for {d}?",
    "I want to cook {d} tonight. How?", "Recipe for {d} please.", "How do you make {a} {d}?",
    "Teach me to make {d}.",
]
USER_RECIPE_DETAILED = [
    "Can you give me a detailed recipe for {d}, with tips and why each step matters?",
    "I am a beginner. Please explain {d} step by step in detail, with tips and storage.",
    "Give me your most complete recipe for {d}, including how to tell it is done.",
]
USER_TIME = [
    "How long do I cook {d}?", "How long does {d} take?", "How long should I {m} the {d}?",
    "What is the cooking time for {d}?",
]
USER_SUB = [
    "I don't have any {x}. What can I use instead in {d}?", "What can I use instead of {x} in {d}?",
    "Can I make {d} without {x}?", "Is there a substitute for {x} in {d}?",
]
USER_VAR = {
    "vegetarian": ["Can I make a vegetarian {d}?", "How do I make {d} without meat?",
                   "Is there a vegetarian version of {d}?"],
    "double": ["How do I make {d} for {n} people?", "Can I double the {d} recipe?"],
    "spicy": ["How can I make {d} spicy?", "Can I make {d} hotter?"],
}
USER_FOLLOWUP_TIME = ["How long does it take?", "How long do I cook it for?", "And how long does it need?"]
USER_FOLLOWUP_SUB = ["What if I don't have {x}?", "Can I use something else instead of {x}?"]


def _degrade(answer: str, dish: Dish, rng: random.Random) -> tuple[str, float]:
    """Return a worse version of an answer and its quality score.

    The degradations are the kinds of noise real scraped data has: terse
    replies, wrong numbers, dropped steps, a stray unhelpful remark.
    """
    kind = rng.choice(["terse", "wrong_time", "drop_steps", "unhelpful", "shuffle"])
    if kind == "terse":
        return rng.choice([f"Just cook the {dish.name} until it is done.", f"{_cap(dish.name)} is easy, look it up.",
                           "Mix everything and cook it.", f"Put it in the oven for a while."]), round(rng.uniform(0.02, 0.2), 2)
    if kind == "unhelpful":
        return rng.choice(["I am not sure, it depends.", "Every cook does it differently.",
                           "You can use whatever you have."]), round(rng.uniform(0.0, 0.15), 2)
    if kind == "wrong_time" and str(dish.time) in answer and dish.time:
        wrong = dish.time * rng.choice([3, 4]) + rng.choice([5, 10])
        return answer.replace(f"{dish.time} minutes", f"{wrong} minutes"), round(rng.uniform(0.3, 0.5), 2)
    lines = answer.split("\n")
    steps = [k for k, line in enumerate(lines) if line[:1].isdigit()]
    if kind == "drop_steps" and len(steps) >= 4:
        drop = set(rng.sample(steps, len(steps) // 2))
        kept = [line for k, line in enumerate(lines) if k not in drop]
        return "\n".join(kept), round(rng.uniform(0.3, 0.55), 2)
    if len(steps) >= 3:
        # shuffle step order but keep the numbering, so the text is fluent but wrong
        bodies = [lines[k].split(". ", 1)[1] for k in steps]
        rng.shuffle(bodies)
        for n, (k, body) in enumerate(zip(steps, bodies), 1):
            lines[k] = f"{n}. {body}"
        return "\n".join(lines), round(rng.uniform(0.25, 0.5), 2)
    return answer.split(". ")[0].rstrip(".") + ".", round(rng.uniform(0.2, 0.45), 2)


def _subs_for(dish: Dish) -> list[tuple]:
    return [s for s in SUBSTITUTIONS if dish.category in s[3] and _uses_ing(dish, s[0])]


def make_record(dishes: list[Dish], rng: random.Random) -> dict:
    """One chat record; the mix of kinds sets the difficulty distribution."""
    dish = rng.choice(dishes)
    d = dish.name
    r = rng.random()
    msgs: list[dict] = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    subs = _subs_for(dish)

    if r < 0.32:
        kind = "recipe"
        q = rng.choice(USER_RECIPE).format(d=d, a=_article(d))
        ans = render_recipe(dish, rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        difficulty = 3 if len(dish.steps) >= 8 else 2
    elif r < 0.52:
        kind = "time"
        q = rng.choice(USER_TIME).format(d=d, m=dish.method)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": timing_answer(dish, rng)}]
        difficulty = 1
    elif r < 0.70 and subs:
        kind = "sub"
        sub = rng.choice(subs)
        q = rng.choice(USER_SUB).format(d=d, x=sub[0])
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": substitution_answer(dish, sub, rng)}]
        difficulty = 1
    elif r < 0.82:
        kind = "var"
        options = ["double", "spicy"] + (["vegetarian", "vegetarian"] if dish.meat else [])
        v = rng.choice(options)
        q = rng.choice(USER_VAR[v]).format(d=d, n=dish.serves * 2)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": variation_answer(dish, v, rng)}]
        difficulty = 2
    elif r < 0.955:
        # Two user turns: a recipe, then a follow-up about time or a substitute.
        kind = "multi"
        q1 = rng.choice(USER_RECIPE).format(d=d, a=_article(d))
        msgs += [{"role": "user", "content": q1}, {"role": "assistant", "content": render_recipe(dish, rng)}]
        if subs and rng.random() < 0.5:
            sub = rng.choice(subs)
            msgs += [{"role": "user", "content": rng.choice(USER_FOLLOWUP_SUB).format(x=sub[0])},
                     {"role": "assistant", "content": substitution_answer(dish, sub, rng)}]
        else:
            msgs += [{"role": "user", "content": rng.choice(USER_FOLLOWUP_TIME)},
                     {"role": "assistant", "content": timing_answer(dish, rng)}]
        difficulty = 3
    else:
        # Long, detailed answers (~400+ tokens) so truncation has something to cut.
        kind = "long"
        q = rng.choice(USER_RECIPE_DETAILED).format(d=d)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": render_recipe(dish, rng, detailed=True)}]
        difficulty = 3

    quality = round(rng.uniform(0.7, 1.0), 2)
    # ~20% of records are degraded; long ones stay clean (they are the "gold" examples).
    if kind != "long" and rng.random() < 0.2:
        last = msgs[-1]["content"]
        bad, quality = _degrade(last, dish, rng)
        msgs[-1] = {"role": "assistant", "content": bad}
    return {"messages": msgs, "quality": quality, "difficulty": difficulty}


# ---------------------------------------------------------------------------
# Prose rendering (pre-training corpus and text samples)
# ---------------------------------------------------------------------------

_CONNECTORS = ["Then", "Next", "After that", "Now", "Once that is done"]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def prose_recipe(dish: Dish, rng: random.Random) -> str:
    """A recipe written as flowing prose -- no bullets, no numbers at line start."""
    opening = rng.choice([
        f"{_cap(dish.name)} is a lovely {dish.category} dish that serves {dish.serves}.",
        f"To make {dish.name} for {dish.serves} people, you do not need much.",
        f"This is how I make {dish.name}. It feeds {dish.serves}.",
        f"{_cap(dish.name)} is one of the easiest things to cook at home.",
        f"Here is a {dish.category} recipe that everyone should know: {dish.name}.",
    ])
    need = f"You will need {_join([i.as_prose() for i in dish.ingredients])}."
    parts = [opening, need]
    for k, st in enumerate(dish.steps):
        text = st.text.rstrip(".")
        if k == 0:
            s = f"First, {_low(text)}."
        elif k == len(dish.steps) - 1:
            s = f"Finally, {_low(text)}."
        else:
            s = f"{rng.choice(_CONNECTORS)}, {_low(text)}."
        if st.why and rng.random() < 0.5:
            s += f" {st.why}"
        parts.append(s)
    extra = []
    if dish.time:
        where = f" at {dish.temp}{DEG}" if dish.temp else ""
        extra.append(rng.choice([
            f"The {dish.name} needs {dish.time} minutes{where}, and it is ready when {dish.doneness}.",
            f"In total you {dish.method} it for {dish.time} minutes{where}.",
        ]))
    if rng.random() < 0.7:
        extra.append(dish.tip)
    if rng.random() < 0.5:
        extra.append(dish.storage)
    if dish.meat and rng.random() < 0.5:
        extra.append(f"For a vegetarian {dish.name}, use {dish.veg_swap} instead of the {dish.meat}.")
    return " ".join(parts + extra)


def prose_short(dish: Dish, rng: random.Random) -> str:
    """Short facts: timing, ingredients, substitutions -- in prose."""
    kind = rng.choice(["time", "ings", "sub", "about"])
    if kind == "time" and dish.time:
        where = f" at {dish.temp}{DEG}" if dish.temp else ""
        return (f"How long to cook {dish.name}: {dish.method} it for {dish.time} minutes{where}. "
                f"You can tell it is ready because {dish.doneness}.")
    if kind == "sub":
        subs = _subs_for(dish)
        if subs:
            miss, repl, how, _ = rng.choice(subs)
            return f"If you are making {dish.name} and have no {miss}, you can use {repl} instead. {how}"
    if kind == "ings":
        return (f"The ingredients for {dish.name} are {_join([i.as_prose() for i in dish.ingredients])}. "
                f"This is enough for {dish.serves}.")
    return f"{_cap(dish.name)} is a {dish.category} dish. {dish.tip} {dish.storage}"


def prose_card(dish: Dish, rng: random.Random) -> str:
    """A recipe card run together as one paragraph: imperative sentences, no list markup.

    It teaches the base model the capitalised step wording the chat answers
    use, while the layout (newlines, bullets, numbering) stays new.
    """
    head = rng.choice(["Ingredients for {d}:", "{D}. Ingredients:", "Recipe card for {d}. Ingredients:"])
    steps = " ".join(st.text for st in dish.steps)
    return (f"{head.format(d=dish.name, D=_cap(dish.name))} {_join([i.as_list_item() for i in dish.ingredients])}. "
            f"Serves {dish.serves}. Method: {steps}")


def prose_faq(dish: Dish, rng: random.Random) -> str:
    """Questions cooks ask, answered in running prose (no chat markup)."""
    kind = rng.choice(["time", "sub", "veg", "double"])
    if kind == "sub":
        subs = _subs_for(dish)
        if subs:
            miss, repl, how, _ = rng.choice(subs)
            q = rng.choice(USER_SUB).format(d=dish.name, x=miss)
            return f"A common question is: {q} The answer is to use {repl}. {how}"
    if kind == "veg" and dish.meat:
        return (f"Can you make a vegetarian {dish.name}? Yes. Leave out the {dish.meat} and add "
                f"{dish.veg_swap} at the same point in the recipe.")
    if kind == "double":
        return (f"To make {dish.name} for {dish.serves * 2} people instead of {dish.serves}, double every "
                f"ingredient and use a bigger pan. The steps stay the same.")
    if not dish.time:
        return f"People often ask how long {dish.name} takes. There is no cooking; it is ready when {dish.doneness}."
    q = rng.choice(USER_TIME).format(d=dish.name, m=dish.method)
    return f"People often ask: {q} {timing_answer(dish, rng)}"


def general_notes(rng: random.Random) -> str:
    """Domain knowledge that is not tied to one dish."""
    miss, repl, how, cats = rng.choice(SUBSTITUTIONS)
    return rng.choice([
        f"When you run out of {miss}, {repl} is a good swap. {how}",
        f"A note on {miss}: in a {rng.choice(cats)} you can replace it with {repl}. {how}",
        "Always taste before you serve and season with salt and pepper as needed.",
        "Preheat the oven properly; a cold oven gives flat cakes and pale bread.",
        "Sharp knives are safer than blunt ones because they do not slip.",
        "Read the whole recipe before you start and get all the ingredients ready.",
        "Rest meat after cooking so the juices settle back into it.",
        "Salt the pasta water well; it should taste like the sea.",
    ])


def build_corpus(dishes: list[Dish], rng: random.Random, n_chars: int) -> str:
    paras: list[str] = []
    total = 0
    while total < n_chars:
        r = rng.random()
        dish = rng.choice(dishes)
        if r < 0.4:
            p = prose_recipe(dish, rng)
        elif r < 0.6:
            p = prose_card(dish, rng)
        elif r < 0.75:
            p = prose_faq(dish, rng)
        elif r < 0.93:
            p = prose_short(dish, rng)
        else:
            p = general_notes(rng)
        paras.append(p)
        total += len(p) + 2
    # Blank line between documents; build_tiny_model.py splits on it.
    return "\n\n".join(paras) + "\n"


# ---------------------------------------------------------------------------
# Tool-calling conversations (data/tools)
# ---------------------------------------------------------------------------
# mlx-lm's record format: a `tools` list per record, assistant `tool_calls`, `tool`
# results. The tool results come from the knowledge base, so the answers are right and
# the model has a real pattern to learn: which tool, which arguments, how to read back.

N_TOOLS_TRAIN, N_TOOLS_VALID, N_TOOLS_TEST = 600, 60, 60


def _tool(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in params.items()}}}}


TOOLS = {
    "get_cooking_time": _tool("get_cooking_time", "Cooking time of a dish", dish="string"),
    "scale_recipe": _tool("scale_recipe", "Scale a recipe to a number of servings",
                          dish="string", servings="integer"),
    "find_substitute": _tool("find_substitute", "A substitute for an ingredient",
                             ingredient="string"),
    "to_fahrenheit": _tool("to_fahrenheit", "Convert an oven temperature", celsius="integer"),
}


class _Calls:
    """Numbers call ids within a conversation; some arguments as JSON strings (both allowed)."""

    def __init__(self, rng: random.Random):
        self.rng, self.n = rng, 0

    def call(self, name: str, **args) -> dict:
        self.n += 1
        as_string = self.rng.random() < 0.2
        return {"id": f"call_{self.n}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def _result(call: dict, payload: dict) -> dict:
    return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
            "content": json.dumps(payload, ensure_ascii=False)}


def _asks(call: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _time_payload(d: Dish) -> dict:
    return {"dish": d.name, "minutes": d.time, "method": d.method, "oven_c": d.temp}


def _time_reply(d: Dish) -> str:
    where = f" at {d.temp}{DEG}" if d.temp else ""
    return f"{_cap(d.name)} takes {d.time} minutes{where}: {d.method} it until {d.doneness}."


def make_tool_record(dishes: list[Dish], rng: random.Random) -> dict:
    calls = _Calls(rng)
    kind = rng.choices(["time", "two_times", "substitute", "scale", "chat"], [4, 2, 2, 1, 1])[0]
    d, e = rng.sample([x for x in dishes if x.time > 0], 2)
    used: list[str]
    if kind == "time":
        c = calls.call("get_cooking_time", dish=d.name)
        msgs = [{"role": "user", "content": rng.choice(USER_TIME).format(d=d.name, m=d.method)},
                _asks(c), _result(c, _time_payload(d)),
                {"role": "assistant", "content": _time_reply(d)}]
        used = ["get_cooking_time"]
    elif kind == "two_times":
        c1 = calls.call("get_cooking_time", dish=d.name)
        c2 = calls.call("get_cooking_time", dish=e.name)
        first = d if d.time <= e.time else e
        msgs = [{"role": "user", "content": f"Which is quicker, {d.name} or {e.name}?"},
                {"role": "assistant", "content": "", "tool_calls": [c1, c2]},
                _result(c1, _time_payload(d)), _result(c2, _time_payload(e)),
                {"role": "assistant", "content": f"{_cap(first.name)} is quicker: {d.name} takes "
                                                 f"{d.time} minutes and {e.name} {e.time}."}]
        used = ["get_cooking_time"]
    elif kind == "substitute":
        miss, repl, how, _ = rng.choice(SUBSTITUTIONS)
        c = calls.call("find_substitute", ingredient=miss)
        msgs = [{"role": "user", "content": f"I have no {miss}. What can I use?"}, _asks(c),
                _result(c, {"ingredient": miss, "substitute": repl, "note": how}),
                {"role": "assistant", "content": f"Use {repl} instead of {miss}. {how}"}]
        used = ["find_substitute"]
        if d.temp and rng.random() < 0.6:  # a second round: the follow-up needs another tool
            c2 = calls.call("to_fahrenheit", celsius=d.temp)
            f = round(d.temp * 9 / 5 + 32)
            msgs += [{"role": "user", "content": f"The {d.name} says {d.temp}{DEG}. What is "
                                                 "that in Fahrenheit?"},
                     _asks(c2), _result(c2, {"celsius": d.temp, "fahrenheit": f}),
                     {"role": "assistant", "content": f"{d.temp}{DEG} is {f} degrees Fahrenheit."}]
            used.append("to_fahrenheit")
    elif kind == "scale":
        n = rng.choice([2, 6, 8, 10, 12])
        c = calls.call("scale_recipe", dish=d.name, servings=n)
        factor = round(n / d.serves, 2)
        msgs = [{"role": "user", "content": f"I need {d.name} for {n} people."}, _asks(c),
                _result(c, {"dish": d.name, "serves": d.serves, "servings": n, "factor": factor}),
                {"role": "assistant", "content": f"The recipe serves {d.serves}. Multiply every "
                                                 f"ingredient by {factor} to serve {n}."}]
        used = ["scale_recipe"]
    else:
        msgs = [{"role": "user", "content": rng.choice(["Hello!", "What can you do?",
                                                        "Can you help me cook?"])},
                {"role": "assistant", "content": "I can look up cooking times, scale recipes, "
                                                 "suggest substitutes and convert oven "
                                                 "temperatures. What are you cooking?"}]
        used = []
    others = [t for t in TOOLS if t not in used]
    # Sometimes a tool the conversation does not need (always one when it needs none).
    names = used + (rng.sample(others, 1) if not used or rng.random() < 0.3 else [])
    rng.shuffle(names)
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are a helpful kitchen assistant."})
    return {"tools": [TOOLS[t] for t in names], "messages": msgs}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # newline="\n" + sort-free json.dumps keeps the bytes identical on every OS.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _unique_records(make: Callable[[], dict], n: int, seen: set[str]) -> list[dict]:
    """Draw records until n new ones, so no conversation is repeated across splits."""
    out = []
    while len(out) < n:
        rec = make()
        key = json.dumps([rec.get("tools"), rec["messages"]], ensure_ascii=False)
        if key in seen:
            continue
        seen.add(key)
        out.append(rec)
    return out


def _approx_len(rec: dict) -> int:
    # Characters plus a per-message allowance for the chat markup: a
    # tokenizer-free proxy (the tokenizer is trained after this script runs).
    return sum(len(m["content"]) + 24 for m in rec["messages"])


def length_grouped(recs: list[dict], rng: random.Random, group: int = GROUP) -> list[dict]:
    """Order records in length-homogeneous groups of ``group``, groups in random order.

    mlx-lm's trainer batches *consecutive* records: its "sort by length" is a
    no-op in mlx-lm 0.32 (``CacheDataset.itemlen`` returns the number of keys
    of the raw record, not its token count).  With shuffled records every
    batch of 8 is padded to its longest member, which more than doubles the
    cost of a LoRA step.  Grouping keeps such batches tight, while shuffling
    the groups keeps any prefix of the file an unbiased sample.
    """
    order = sorted(range(len(recs)), key=lambda k: (_approx_len(recs[k]), k))
    groups = [order[i:i + group] for i in range(0, len(order), group)]
    # A short last group stays last: in the middle it would shift every later
    # batch boundary off the group boundaries.
    tail = [groups.pop()] if len(groups[-1]) < group else []
    rng.shuffle(groups)
    return [recs[k] for g in groups + tail for k in g]


def generate(out_dir: Path) -> dict[str, Path]:
    """Write every dataset file under ``out_dir``; return {name: path}."""
    dishes = build_dishes()
    written: dict[str, Path] = {}

    # Independent RNG streams per artefact: changing one generator's draws
    # does not reshuffle the others.
    rng = random.Random(SEED)
    seen: set[str] = set()
    for split, n in (("train", N_TRAIN), ("valid", N_VALID), ("test", N_TEST)):
        recs = _unique_records(lambda: make_record(dishes, rng), n, seen)
        recs = length_grouped(recs, rng)
        p = out_dir / "recipes" / f"{split}.jsonl"
        _write_jsonl(p, recs)
        written[f"recipes/{split}"] = p

    crng = random.Random(SEED + 1)
    corpus = build_corpus(dishes, crng, CORPUS_CHARS)
    p = out_dir / "corpus" / "pretrain.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(corpus, encoding="utf-8", newline="\n")
    written["corpus"] = p

    trng = random.Random(SEED + 3)
    tseen: set[str] = set()
    for split, n in (("train", N_TOOLS_TRAIN), ("valid", N_TOOLS_VALID), ("test", N_TOOLS_TEST)):
        recs = _unique_records(lambda: make_tool_record(dishes, trng), n, tseen)
        p = out_dir / "tools" / f"{split}.jsonl"
        _write_jsonl(p, recs)
        written[f"tools/{split}"] = p
    # Every function spec the chats use, for `mlx-tune generate --tools data/tools/tools.json`.
    p = out_dir / "tools" / "tools.json"
    p.write_text(json.dumps(list(TOOLS.values()), ensure_ascii=False, indent=2) + "\n",
                 encoding="utf-8", newline="\n")
    written["tools/tools.json"] = p

    srng = random.Random(SEED + 2)
    for split, n in (("train", N_SAMPLES_TRAIN), ("valid", N_SAMPLES_VALID)):
        comp = []
        for _ in range(n):
            dish = srng.choice(dishes)
            if srng.random() < 0.5:
                comp.append({"prompt": srng.choice(USER_TIME).format(d=dish.name, m=dish.method),
                             "completion": timing_answer(dish, srng)})
            else:
                comp.append({"prompt": srng.choice(USER_RECIPE).format(d=dish.name, a=_article(dish.name)),
                             "completion": render_recipe(dish, srng)})
        p = out_dir / "samples" / "completions" / f"{split}.jsonl"
        _write_jsonl(p, comp)
        written[f"samples/completions/{split}"] = p

        texts = [{"text": prose_recipe(srng.choice(dishes), srng)} for _ in range(n)]
        p = out_dir / "samples" / "text" / f"{split}.jsonl"
        _write_jsonl(p, texts)
        written[f"samples/text/{split}"] = p

    def write(rel: str, records: list[dict]) -> Path:
        _write_jsonl(out_dir / rel, records)
        return out_dir / rel

    written.update(preference_data.generate_preference(sys.modules[__name__], dishes, SEED + 4,
                                                       write))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data",
                    help="output directory (default: <repo>/data)")
    args = ap.parse_args(argv)
    for name, path in generate(args.out).items():
        print(f"{name:28s} {path.stat().st_size:>9,d} bytes  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
