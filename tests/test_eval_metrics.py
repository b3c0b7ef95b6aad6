"""The toy DreamBench metrics measure what they claim, on renders whose ground truth is known."""
from __future__ import annotations

import random

import numpy as np

from dreambooth_core.embedded import toyworld as tw
from dreambooth_core.evaluation import metrics as m
from dreambooth_core.evaluation.protocol import subject_prompts


def test_subject_fidelity_prefers_the_subject_over_other_subjects_and_its_plain_class():
    rng = random.Random(0)
    for subject in tw.EVAL_SUBJECTS[:4]:
        ref = m.subject_reference(subject)
        own = m.subject_fidelity(tw.subject_views(subject, 6, seed=77), ref)
        others = [m.subject_fidelity(tw.subject_views(o, 6, seed=77), ref) for o in tw.EVAL_SUBJECTS if o != subject]
        plain = [tw.render(tw.random_view(rng, tw.random_thing(rng, [subject.class_noun]))) for _ in range(8)]
        assert own > 0.9
        assert own > max(others) + 0.1
        assert own > m.subject_fidelity(plain, ref) + 0.2


def test_shape_classifier_reads_the_rendered_shape():
    rng = random.Random(1)
    scenes = [tw.random_scene(rng) for _ in range(60)]
    hits = [m.object_shape(tw.render(s)) == s.thing.shape for s in scenes]
    assert np.mean(hits) > 0.9


def test_prompt_checks_pass_on_matching_renders_and_fail_on_others():
    rng = random.Random(2)
    subject = tw.EVAL_SUBJECTS[0]
    for prompt in subject_prompts(subject):
        ask = prompt.ask
        thing = subject.thing
        if ask.colour:
            thing = tw.Thing(thing.shape, ask.colour, "plain")
        if ask.shape:
            thing = tw.Thing(ask.shape, thing.colour, thing.pattern, thing.colour2)
        companion = tw.Thing("circle", ask.companion) if ask.companion else None
        scene = tw.random_view(rng, thing, background=ask.background, companion=companion)
        assert ask.score(tw.render(scene)) == 1.0, prompt.template
        wrong = tw.random_view(rng, tw.Thing("ring" if thing.shape != "ring" else "cross", "black" if ask.colour != "black" else "white"),
                               background="green" if ask.background != "green" else "red")
        assert ask.score(tw.render(wrong)) < 1.0, prompt.template


def test_diversity_is_zero_for_copies_and_grows_with_variety():
    rng = random.Random(3)
    same = [tw.render(tw.random_view(random.Random(5), tw.DEMO_SUBJECT.thing))] * 4
    varied = [tw.render(tw.random_scene(rng)) for _ in range(4)]
    assert m.diversity(same) == 0.0
    assert m.diversity(varied) > 0.1


def test_every_subject_gets_prompts_of_the_four_kinds():
    for subject in tw.EVAL_SUBJECTS:
        kinds = {p.kind for p in subject_prompts(subject)}
        assert kinds == {"recontextualization", "property_modification", "accessories", "class_hybrid"}
        for p in subject_prompts(subject):
            assert "{token}" in p.template
