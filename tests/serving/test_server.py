"""`idefics serve` on the demo model, driven by the official `openai` client over loopback: answers, streaming,
usage, n, logprobs, logit_bias, completions with a raw prompt, file:// images, and 24 concurrent clients."""

import asyncio

import httpx
import openai
import pytest
from server_process import BLUE_TRIANGLE, EXAMPLES, RED_CIRCLE, ServerProcess, ask

import idefics

KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--api-key", KEY, "--served-model-name", "demo", "other-name",
                            "--allowed-local-media-path", str(EXAMPLES))  # fmt: skip
    yield process
    process.terminate()
    assert process.proc.wait(timeout=60) == 0, "".join(process.log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model="demo", messages=messages, temperature=0, **kwargs)


def test_the_demo_model_answers(client):
    reply = chat(client, ask("What color is the shape?"))
    assert reply.choices[0].message.content == "Red."
    assert reply.choices[0].finish_reason == "stop" and reply.model == "demo"
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens >= 2
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert chat(client, ask("What shape is this?", BLUE_TRIANGLE)).choices[0].message.content == "A triangle."


def test_streamed_text_equals_the_plain_answer_with_a_usage_chunk_last(client):
    messages = ask("Describe the image.", BLUE_TRIANGLE)
    plain = chat(client, messages)
    chunks = list(chat(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == "A blue triangle."
    token_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content is not None][1:]
    assert len(token_chunks) == plain.usage.completion_tokens  # one chunk per token
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_n_choices_logprobs_and_stop_strings(client):
    reply = chat(client, ask("Describe the image."), n=2, logprobs=True, top_logprobs=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert {c.message.content for c in reply.choices} == {"A red circle."}
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens // 2
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy picks the likeliest
    cut = chat(client, ask("Describe the image."), stop=" circle")
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("A red", "stop")
    short = chat(client, ask("Describe the image."), max_completion_tokens=1)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == ("A", "length")


def test_sampling_with_a_seed_repeats(client):
    first = chat(client, ask("Describe the image."), seed=7, n=1).choices[0].message.content
    again = client.chat.completions.create(
        model="demo", messages=ask("Describe the image."), temperature=1.5, seed=7, max_tokens=8
    )
    same = client.chat.completions.create(
        model="demo", messages=ask("Describe the image."), temperature=1.5, seed=7, max_tokens=8
    )
    assert first == "A red circle." and again.choices[0].message.content == same.choices[0].message.content


def test_logit_bias_forces_and_bans_tokens(client):
    tokenizer = idefics.IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL).tokenizer
    blue, red = (tokenizer(" " + word, add_special_tokens=False)["input_ids"][-1] for word in ("blue", "red"))
    forced = chat(client, ask("Describe the image."), max_tokens=3, logit_bias={str(blue): 100})
    assert forced.choices[0].message.content == "blue blue blue"
    banned = chat(client, ask("Describe the image."), max_tokens=6, logit_bias={red: -100}).choices[0].message.content
    assert banned.startswith("A ") and "red" not in banned  # "A red circle." without its likeliest second token


def test_completions_with_a_raw_prompt_and_images(client, server):
    prompt = "User:<image>What color is the shape?<end_of_utterance>\nAssistant:"
    reply = client.completions.create(
        model="other-name", prompt=prompt, temperature=0, max_tokens=8, logprobs=2, extra_body={"images": [RED_CIRCLE]}
    )
    assert reply.choices[0].text == "Red." and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].logprobs.tokens[0] and len(reply.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = client.completions.create(
        model="demo", prompt=prompt, temperature=0, max_tokens=8, stream=True, extra_body={"images": [RED_CIRCLE]}
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "Red."


def test_file_urls_inside_the_allowed_folder(client):
    url = (EXAMPLES / "blue_triangle.png").as_uri()
    assert chat(client, ask("What color is the shape?", url)).choices[0].message.content == "Blue."


def test_models_health_metrics_and_the_playground(server, client):
    assert [m.id for m in client.models.list().data] == ["demo", "other-name"]
    assert server.health() == 200
    assert httpx.get(server.base_url + "/health").status_code == 200  # no key needed outside /v1
    assert server.metric("idefics_request_success_total") >= 0
    assert server.metric("idefics_time_to_first_token_seconds_count") > 0
    for cache in ("image_cache", "prefix_cache"):
        for key in ("hits_total", "misses_total", "evictions_total", "bytes"):
            assert server.metric(f"idefics_{cache}_{key}") >= 0
    page = httpx.get(server.base_url + "/")
    assert page.status_code == 200 and "<html" in page.text and "/v1/chat/completions" in page.text


def test_a_wrong_key_and_remote_images_are_refused(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        chat(bad, ask("What?"))
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        chat(good, ask("What?", "https://example.com/cat.png"))
    assert "--allow-remote-images" in err.value.body["message"]


def test_24_concurrent_clients_get_the_sequential_greedy_answers(server, client):
    questions = ["What color is the shape?", "What shape is this?", "Describe the image."]
    requests = [(q, image, 8 + i % 5) for i, (q, image) in
                enumerate((q, image) for image in (RED_CIRCLE, BLUE_TRIANGLE) for q in questions * 4)]  # fmt: skip
    assert len(requests) == 24
    sequential = [chat(client, ask(q, image), max_tokens=m).choices[0].message.content for q, image, m in requests]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0) as aclient:

            async def one(i, question, image, max_tokens):
                kwargs = dict(model="demo", messages=ask(question, image), temperature=0, max_tokens=max_tokens)
                if i % 2:  # half of them streamed
                    stream = await aclient.chat.completions.create(stream=True, **kwargs)
                    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                return (await aclient.chat.completions.create(**kwargs)).choices[0].message.content

            return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))

    assert asyncio.run(run_all()) == sequential
    assert {"Red.", "Blue.", "A circle.", "A triangle.", "A red circle.", "A blue triangle."} == set(sequential)
