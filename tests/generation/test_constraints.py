"""Structured outputs in generate() and stream_generate: every output satisfies its constraint (jsonschema, re and
membership as oracles) on a random model and the demo model; the bitmask covers the whole logits width; bad
constraints are refused naming their field; each constraint compiles once."""

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from structured_fixture import MAX_TOKENS, constraints, satisfies

import idefics
from idefics.generation import GenerationConfig, generate_steps, stream_generate
from idefics.generation.constraints import Constraint, ConstraintError
from idefics.generation.grammar import GrammarCompiler, apply_bitmask_, compiler_for, fill_bitmask, new_bitmask
from idefics.processing import IdeficsTokenizer
from idefics.processing.processor import IdeficsProcessor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def random_model(random_text_model):
    model = idefics.IdeficsForVisionText2Text.from_pretrained(random_text_model)
    return model, IdeficsTokenizer.from_pretrained(random_text_model)


@pytest.fixture(scope="module")
def demo():
    return (idefics.IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL),
            IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL))  # fmt: skip


def run(model, tokenizer, input_ids, attention_mask=None, **kwargs) -> list[tuple[list[int], bool]]:
    """(tokens up to the row's end, whether it finished) per row."""
    config = GenerationConfig(max_new_tokens=MAX_TOKENS, eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **kwargs)
    rows = [([], False) for _ in range(input_ids.shape[0])]
    for step in generate_steps(model, input_ids, config=config, tokenizer=tokenizer, attention_mask=attention_mask):
        for r, (token, done) in enumerate(zip(step.tokens.tolist(), step.finished.tolist(), strict=True)):
            if not rows[r][1]:
                rows[r] = (rows[r][0] + [token], done)
    return rows


def prompts(tokenizer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    texts = ["User: describe the picture\nAssistant:", "What is this?", "Answer:", f"Question {seed}: the cat?"]
    batch = tokenizer(texts, padding="longest", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("constraint", constraints(), ids=lambda c: c.kind)
def test_every_sampled_output_satisfies_its_constraint_on_a_random_model(random_model, constraint):
    model, tokenizer = random_model
    ids, mask = prompts(tokenizer, 0)
    for seed in (1, 2):
        rows = run(model, tokenizer, ids, mask, do_sample=True, temperature=1.0, top_k=0, seed=seed,
                   constraint=constraint)  # fmt: skip
        for tokens, finished in rows:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if finished:
                assert satisfies(text, constraint), (constraint, text)
            else:  # only an unbounded grammar may run out of tokens
                assert constraint.kind == "json_object" and len(tokens) == MAX_TOKENS, (constraint, text)


def test_greedy_rows_of_a_padded_batch_equal_the_rows_alone(random_model):
    model, tokenizer = random_model
    ids, mask = prompts(tokenizer, 3)
    constraint = constraints()[0]
    together = run(model, tokenizer, ids, mask, constraint=constraint)
    for r in range(ids.shape[0]):
        keep = mask[r].bool()
        assert run(model, tokenizer, ids[r : r + 1, keep], constraint=constraint) == [together[r]]
        assert satisfies(tokenizer.decode(together[r][0], skip_special_tokens=True), constraint)


def test_the_bitmask_covers_the_additional_logit_rows(random_model):
    model, tokenizer = random_model
    width = model.config.vocab_size + model.config.additional_vocab_size
    compiler = compiler_for(tokenizer, width)
    assert width > len(tokenizer) and compiler.width == width
    state = compiler.compile(Constraint.choice(["yes", "no"])).start([tokenizer.eos_token_id])
    bitmask = new_bitmask(1, compiler)
    fill_bitmask(bitmask, [(0, state)])
    logits = torch.zeros(1, width)
    logits[0, -2:] = 1e9  # the additional rows: no tokenizer token, never allowed
    apply_bitmask_(logits, bitmask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(i < len(tokenizer) for i in allowed)
    pieces = [tokenizer.decode([i]).strip() for i in allowed]  # "" is the leading space the decoder strips
    assert all("yes".startswith(p) or "no".startswith(p) for p in pieces) and {"y", "n"} <= set(pieces), pieces
    assert tokenizer.eos_token_id not in allowed  # nothing generated yet: not complete


def test_apply_bitmask_matches_the_bits():
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(3, 100, generator=g)
    expected = logits.clone()
    for r in range(3):
        for v in range(100):
            if not (int(bitmask[r, v // 32]) >> (v % 32)) & 1:
                expected[r, v] = -float("inf")
    strided = logits.t().contiguous().t()  # the other path: not contiguous
    assert torch.equal(apply_bitmask_(logits, bitmask), expected)
    assert torch.equal(apply_bitmask_(strided, bitmask), expected)


def test_the_demo_model_answers_within_its_constraint(demo):
    model, processor = demo
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(EXAMPLES / "red_circle.png")},
                                             {"type": "text", "text": "What color is the shape?"}]}]  # fmt: skip
    inputs = processor(processor.apply_chat_template(messages))
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")

    def answer(constraint, **kwargs):
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, eos_token_id=[2, eou], constraint=constraint,
                             tokenizer=processor.tokenizer, **kwargs)  # fmt: skip
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)

    assert answer(None) == "Red."
    # the first word may keep its space marker ("▁Red"): the model's own answer, and the text still matches
    assert compiler_for(processor.tokenizer, 404).leading_space
    assert answer(Constraint.choice(["Blue.", "Red.", "Green."])) == "Red."
    assert answer(Constraint.regex(r"[A-Z][a-z]+\.")) == "Red."
    for constraint in constraints():
        text = answer(constraint)
        assert satisfies(text, constraint) or constraint.kind == "json_object", (constraint, text)
    streamed = "".join(stream_generate(model, processor.tokenizer, max_new_tokens=MAX_TOKENS, eos_token_id=[2, eou],
                                       constraint=constraints()[0], **inputs))  # fmt: skip
    assert streamed == answer(constraints()[0])


def test_bad_constraints_are_refused_naming_their_field(random_model):
    model, tokenizer = random_model
    ids = torch.tensor([[5, 6, 7]])
    compiler = compiler_for(tokenizer, model.config.vocab_size + model.config.additional_vocab_size)
    cases = [
        (Constraint.regex("a(b", param="guided_regex"), "guided_regex: invalid regex.*unclosed group"),
        (Constraint.json_schema({"type": "nonsense"}, param="response_format"), "response_format: invalid json schema"),
        (Constraint.json_schema({"type": "object", "properties": 3}), "json_schema: invalid json schema"),
    ]
    for constraint, message in cases:
        with pytest.raises(ConstraintError, match=message) as err:
            compiler.compile(constraint)
        assert err.value.param == constraint.param
        with pytest.raises(ConstraintError, match=message):  # failures are not cached: the same error again
            model.generate(ids, max_new_tokens=2, constraint=constraint, tokenizer=tokenizer)
    with pytest.raises(ConstraintError, match="choice: choices must be a non-empty list"):
        Constraint.choice([])
    with pytest.raises(ConstraintError, match="x: the schema is not valid JSON"):
        Constraint.json_schema("{nope", param="x")
    with pytest.raises(ValueError, match="need a tokenizer"):
        model.generate(ids, max_new_tokens=2, constraint=Constraint.json_object())
    with pytest.raises(ValueError, match="not beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, constraint=Constraint.json_object(), tokenizer=tokenizer)


def test_each_constraint_compiles_once_even_when_asked_concurrently(random_model, monkeypatch):
    model, tokenizer = random_model
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size + model.config.additional_vocab_size)
    builds, release = [], threading.Event()
    real = compiler._build

    def slow_build(constraint):
        builds.append(constraint)
        release.wait(10)
        return real(constraint)

    monkeypatch.setattr(compiler, "_build", slow_build)
    constraint = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    results = []
    threads = [threading.Thread(target=lambda: results.append(compiler.compile(constraint))) for _ in range(4)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 4 and all(r is results[0] for r in results)
    assert compiler.compile(Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert len(builds) == 1 and compiler.cached(constraint)


def test_the_thread_pool_fills_the_same_masks_as_the_inline_path(random_model, monkeypatch):
    from idefics.generation import grammar

    model, tokenizer = random_model
    compiler = compiler_for(tokenizer, model.config.vocab_size + model.config.additional_vocab_size)
    compiled = compiler.compile(constraints()[2])
    states = [compiled.start([2]) for _ in range(grammar.PARALLEL_ROWS)]
    for i, state in enumerate(states):  # rows at different places in the grammar
        for _ in range(i):
            mask = new_bitmask(1, compiler)
            fill_bitmask(mask, [(0, state)])
            state.accept(int(apply_bitmask_(torch.zeros(1, compiler.vocab_size), mask).argmax()))
    inline = new_bitmask(len(states), compiler)
    fill_bitmask(inline, list(enumerate(states)))
    monkeypatch.setattr(grammar.os, "cpu_count", lambda: 16)
    pooled = new_bitmask(len(states), compiler)
    fill_bitmask(pooled, list(enumerate(states)))
    assert torch.equal(inline, pooled) and len({tuple(row.tolist()) for row in inline}) > 1
