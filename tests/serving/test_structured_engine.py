"""Structured outputs in the engine: constrained and free requests share decode batches and each gets what it
gets alone (greedy, token for token, against generate()); sampled outputs satisfy their constraints; a constraint
that cannot finish in max_tokens ends "length"; a slow grammar compile never stalls other requests' decoding."""

import threading

import pytest
import torch
from structured_fixture import MAX_TOKENS, constraints, satisfies

import idefics
from idefics.generation import GenerationConfig, generate_steps
from idefics.generation.constraints import Constraint, ConstraintError
from idefics.generation.grammar import compiler_for
from idefics.serving import Engine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def random_model(random_text_model):
    model = idefics.IdeficsForVisionText2Text.from_pretrained(random_text_model)
    return model, idefics.IdeficsProcessor.from_pretrained(random_text_model)


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 900, (length,), generator=g).tolist()


def alone(model, tokenizer, ids: list[int], max_tokens: int, constraint: Constraint | None) -> list[int]:
    """generate() on the request alone: its tokens up to and including the one that finished it."""
    config = GenerationConfig(max_new_tokens=max_tokens, eos_token_id=2, pad_token_id=0, constraint=constraint)
    tokens = []
    for step in generate_steps(model, torch.tensor([ids]), config=config, tokenizer=tokenizer):
        tokens.append(int(step.tokens[0]))
        if bool(step.finished[0]):
            break
    return tokens


def drive(engine: Engine, schedule: dict[int, list]) -> dict:
    """Step the engine in this thread, submitting schedule[step] = [(key, prompt, params)] before each step."""
    streams = {}
    for step in range(400):
        for key, ids, params in schedule.get(step, []):
            streams[key] = engine.submit(ids, params)
        if not engine.step() and step >= max(schedule):
            return streams
    raise AssertionError("the engine did not finish")


def test_constrained_and_free_rows_in_one_batch_each_get_what_they_get_alone(random_model):
    model, processor = random_model
    kinds = [None, *constraints()[:3], None, constraints()[3], constraints()[6], None, constraints()[-1]]
    requests = {f"r{i}": (prompt(i, 4 + 3 * i), 8 + 4 * (i % 3), c) for i, c in enumerate(kinds)}
    schedule = {0: ["r0", "r1", "r2"], 1: ["r3", "r4"], 3: ["r5", "r6", "r7"], 6: ["r8"]}
    engine = Engine(model, processor, EngineConfig(max_batch_size=6, prefill_token_budget=64))
    streams = drive(engine, {step: [(k, requests[k][0], SamplingParams(max_tokens=requests[k][1], temperature=0,
                                                                       constraint=requests[k][2])) for k in keys]
                             for step, keys in schedule.items()})  # fmt: skip
    for key, (ids, max_tokens, constraint) in requests.items():
        result = streams[key].result()[0]
        assert result.token_ids == alone(model, processor.tokenizer, ids, max_tokens, constraint), key
        if constraint is not None and result.finish_reason == "stop":
            assert satisfies(result.text, constraint), (key, result.text)
    assert engine.stats()["constrained_total"] == {"json_schema": 3, "json_object": 1, "regex": 1, "choice": 1}


def test_sampled_choices_satisfy_their_constraints(random_model):
    model, processor = random_model
    engine = Engine(model, processor, EngineConfig(max_batch_size=8))
    schedule = {0: [(i, prompt(50 + i, 6), SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, n=2,
                                                          constraint=c))
                    for i, c in enumerate(constraints()[:-1])]}  # fmt: skip
    streams = drive(engine, schedule)
    for i, constraint in enumerate(constraints()[:-1]):
        for choice in streams[i].result():
            assert choice.finish_reason == "stop" and satisfies(choice.text, constraint), (constraint, choice.text)


def test_a_constraint_that_cannot_finish_ends_with_length(random_model):
    model, processor = random_model
    long = Constraint.json_schema({"type": "object", "properties": {"text": {"type": "string", "minLength": 50}},
                                   "required": ["text"]})  # fmt: skip
    engine = Engine(model, processor, EngineConfig(max_batch_size=2))
    streams = drive(engine, {0: [("long", prompt(1, 5), SamplingParams(max_tokens=4, temperature=0, constraint=long)),
                                 ("next", prompt(2, 5), SamplingParams(max_tokens=4, temperature=0))]})  # fmt: skip
    result = streams["long"].result()[0]
    assert result.finish_reason == "length" and result.completion_tokens == 4
    assert result.text.startswith('{"') and not satisfies(result.text, long)
    assert streams["next"].result()[0].completion_tokens == 4


def test_a_slow_compile_never_stalls_decoding(random_model, monkeypatch):
    model, processor = random_model
    compiler = compiler_for(processor.tokenizer, model.config.vocab_size + model.config.additional_vocab_size)
    started, release = threading.Event(), threading.Event()
    real = compiler._build

    def slow_build(constraint):
        started.set()
        assert release.wait(60)
        return real(constraint)

    monkeypatch.setattr(compiler, "_build", slow_build)
    slow = Constraint.regex("[a-c]{3}x")  # compiled nowhere else
    with Engine(model, processor, EngineConfig(max_batch_size=4)) as engine:
        submitted = []
        worker = threading.Thread(target=lambda: submitted.append(
            engine.submit(prompt(3, 5), SamplingParams(max_tokens=8, temperature=0, constraint=slow))))  # fmt: skip
        worker.start()
        assert started.wait(30)
        free = engine.submit(prompt(4, 5), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        assert free.result(timeout=60)[0].completion_tokens == 24  # decoded while the compile still waits
        assert not submitted and worker.is_alive()
        release.set()
        worker.join(30)
        result = submitted[0].result(timeout=60)[0]
    assert result.finish_reason == "stop" and satisfies(result.text, slow)


def test_bad_constraints_fail_at_submit(random_model):
    model, processor = random_model
    engine = Engine(model, processor)
    with pytest.raises(ConstraintError, match="guided_regex: invalid regex") as err:
        engine.submit([5, 6], SamplingParams(constraint=Constraint.regex("(", param="guided_regex")))
    assert err.value.param == "guided_regex"
    with pytest.raises(ValueError, match="needs an engine with a processor"):
        Engine(model).submit([5, 6], SamplingParams(constraint=Constraint.json_object()))
    with pytest.raises(ValueError, match="SamplingParams.constraint must be a Constraint"):
        SamplingParams(constraint={"type": "object"})
    assert engine.stats()["waiting"] == 0
