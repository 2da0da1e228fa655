"""Structured outputs through `idefics serve` with the official `openai` client, on the demo model and on a random
model: 50 random prompts per kind (JSON schema, JSON object, regex, choice), streamed and not, over both endpoints
and every spelling (OpenAI's `response_format`, vLLM's `structured_outputs` and `guided_*`); every output that
finishes satisfies its constraint (jsonschema, re and membership as oracles) while free greedy requests in the same
batches keep their answers; bad constraints are 400s naming the field; `/metrics` counts constrained requests."""

import asyncio
import json
import random

import openai
import pytest
from server_process import BLUE_TRIANGLE, RED_CIRCLE, ServerProcess, ask
from structured_fixture import CHOICES, MAX_TOKENS, REGEXES, SCHEMAS, satisfies

from idefics.generation.constraints import Constraint

PROMPTS = 50  # per kind, each sent streamed and not
WORDS = "the color shape of this what is a red blue green circle square triangle describe picture answer".split()


@pytest.fixture(scope="module", params=["demo", "random"])
def server(request):
    if request.param == "demo":
        process = ServerProcess("--served-model-name", "m", "--max-batch-size", "16", "--max-queue", "512")
    else:
        folder = request.getfixturevalue("random_text_model")
        process = ServerProcess("--model", str(folder), "--served-model-name", "m", "--max-batch-size", "16",
                                "--max-queue", "512")  # fmt: skip
    process.images = request.param == "demo"
    yield process
    process.terminate()
    assert process.proc.wait(timeout=60) == 0, "".join(process.log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


# kind -> (its specs, the Constraint for a spec, vLLM's structured_outputs key, the older guided_* field)
KINDS = {
    "json_schema": (SCHEMAS, Constraint.json_schema, "json", "guided_json"),
    "regex": (REGEXES, Constraint.regex, "regex", "guided_regex"),
    "choice": (CHOICES, Constraint.choice, "choice", "guided_choice"),
}


def random_request(rng: random.Random, kind: str, *, images: bool) -> tuple[dict, Constraint, str]:
    """(create() keyword arguments, the constraint they ask for, the endpoint) for one random prompt, in one of the
    spellings a client may use."""
    question = " ".join(rng.choices(WORDS, k=rng.randint(2, 9))).capitalize() + "?"
    sampling = dict(max_tokens=MAX_TOKENS, temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randrange(1000))
    extra = {}
    if kind == "json_object":
        constraint = Constraint.json_object()
        sampling["response_format"] = {"type": "json_object"}
    else:
        specs, build, key, guided = KINDS[kind]
        spec = rng.choice(specs)
        constraint = build(spec)
        spelling = rng.choice(["structured_outputs", "guided"] + (["response_format"] if kind == "json_schema" else []))
        if spelling == "response_format":
            sampling["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": spec, "strict": True},
            }
        else:
            extra = {"structured_outputs": {key: spec}} if spelling == "structured_outputs" else {guided: spec}
    endpoint = "chat" if "response_format" in sampling or rng.random() < 0.6 else "completions"
    if endpoint == "chat":
        image = rng.choice([RED_CIRCLE, BLUE_TRIANGLE]) if images and rng.random() < 0.7 else None
        sampling["messages"] = ask(question, image)
    else:
        sampling["prompt"] = f"User:{question}<end_of_utterance>\nAssistant:"
    return {**sampling, "extra_body": extra}, constraint, endpoint


async def send(aclient, kwargs: dict, endpoint: str, *, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of one request."""
    api = aclient.chat.completions if endpoint == "chat" else aclient.completions
    if not stream:
        choice = (await api.create(model="m", **kwargs)).choices[0]
        return (choice.message.content if endpoint == "chat" else choice.text), choice.finish_reason
    text, reason = "", None
    async for chunk in await api.create(model="m", stream=True, **kwargs):
        for choice in chunk.choices:
            text += (choice.delta.content or "") if endpoint == "chat" else choice.text
            reason = choice.finish_reason or reason
    return text, reason


def test_every_constrained_output_satisfies_its_constraint(server, client):
    rng = random.Random(22)
    jobs = [(*random_request(rng, kind, images=server.images), stream)
            for kind in ("json_schema", "json_object", "regex", "choice") for _ in range(PROMPTS)
            for stream in (False, True)]  # fmt: skip
    free = [
        (
            {"messages": ask(q, RED_CIRCLE if server.images else None), "max_tokens": 12, "temperature": 0},
            None,
            "chat",
            False,
        )
        for q in ("What color is the shape?", "Describe the image.", "What shape is this?")
    ]
    alone = [client.chat.completions.create(model="m", **kwargs).choices[0].message.content for kwargs, *_ in free]
    jobs += free * 8  # free greedy requests interleaved with the constrained ones, in the same decode batches
    rng.shuffle(jobs)

    async def run_all():
        limit = asyncio.Semaphore(24)
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:  # fmt: skip

            async def one(kwargs, endpoint, stream):
                async with limit:
                    return await send(aclient, kwargs, endpoint, stream=stream)

            return await asyncio.gather(*(one(kwargs, endpoint, stream) for kwargs, _, endpoint, stream in jobs))

    results = asyncio.run(run_all())
    unfinished = 0
    for (kwargs, constraint, endpoint, stream), (text, reason) in zip(jobs, results, strict=True):
        if constraint is None:
            assert text in alone, (kwargs, text)
            continue
        if reason == "length":  # only "any JSON object" is unbounded; every other grammar here ends in MAX_TOKENS
            assert constraint.kind == "json_object", (constraint, endpoint, stream, text)
            unfinished += 1
            continue
        assert reason == "stop" and satisfies(text, constraint), (constraint, endpoint, stream, text)
    assert unfinished < PROMPTS  # most objects close
    counts = constrained_counts(server)
    assert counts["json_schema"] >= 2 * PROMPTS and counts["choice"] >= 2 * PROMPTS


def constrained_counts(server) -> dict[str, float]:
    import httpx

    counts = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("idefics_constrained_requests_total{"):
            kind = line.split('kind="')[1].split('"')[0]
            counts[kind] = float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format.json_schema.schema"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
        ({"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=ask("Hi?", None), max_tokens=4, extra_body=extra)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    assert err.value.body["message"].startswith(param), err.value.body


def test_a_constraint_that_cannot_finish_ends_with_length(client):
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 60}}, "required": ["text"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}
    reply = client.chat.completions.create(model="m", messages=ask("Hi?", None), max_tokens=6, response_format=fmt)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert reply.choices[0].message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.choices[0].message.content)
    chunks = list(client.completions.create(model="m", prompt="Hi", max_tokens=6, stream=True,
                                            extra_body={"guided_json": schema}))  # fmt: skip
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert client.models.list().data[0].id == "m"  # still serving
