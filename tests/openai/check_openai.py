"""Drives the OpenAI-compatible HTTP API with the official `openai` package, unmodified.

Usage: python check_openai.py BASE_URL API_KEY CASES_JSON

CASES_JSON holds the model id and a list of chat requests, each with the answer the gRPC
API gave for the same request (`text`, `token_ids`, `finish_reason`). For every case this
checks a plain completion and a streamed one against it; then the models list, a bad
request (400 with an OpenAI-style JSON error body) and a missing key (401). Exits non-zero
on the first mismatch.
"""

import json
import sys

import openai


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def expect(cond, msg):
    if not cond:
        fail(msg)


def main():
    base_url, api_key, cases_path = sys.argv[1:4]
    with open(cases_path) as f:
        spec = json.load(f)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    model = spec["model"]
    checks = 0

    listed = [m.id for m in client.models.list()]
    expect(model in listed, f"models list {listed} lacks {model}")
    checks += 1

    for case in spec["cases"]:
        name, want = case["name"], case["expect"]
        kwargs = dict(model=model, messages=case["messages"], max_tokens=case.get("max_tokens"))
        if "stop" in case:
            kwargs["stop"] = case["stop"]
        extra = {"dimple": case["dimple"]} if "dimple" in case else None

        resp = client.chat.completions.create(**kwargs, extra_body=extra)
        choice = resp.choices[0]
        expect(choice.message.content == want["text"],
               f"{name}: text {choice.message.content!r} != gRPC {want['text']!r}")
        expect(choice.finish_reason == want["finish_reason"],
               f"{name}: finish_reason {choice.finish_reason!r} != {want['finish_reason']!r}")
        details = resp.model_extra["dimple"]
        expect(details["token_ids"] == want["token_ids"],
               f"{name}: token ids {details['token_ids']} != gRPC {want['token_ids']}")
        expect(resp.usage.prompt_tokens == want["prompt_tokens"],
               f"{name}: prompt_tokens {resp.usage.prompt_tokens} != {want['prompt_tokens']}")
        expect(resp.usage.completion_tokens == want["completion_tokens"],
               f"{name}: completion_tokens {resp.usage.completion_tokens} != {want['completion_tokens']}")
        expect(resp.usage.model_extra["forward_passes"] == want["steps"],
               f"{name}: forward passes {resp.usage.model_extra['forward_passes']} != {want['steps']}")
        checks += 1

        stream = client.chat.completions.create(**kwargs, stream=True, extra_body=extra)
        pieces, finish, step_chunks = [], None, 0
        for chunk in stream:
            c = chunk.choices[0]
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason is not None:
                finish = c.finish_reason
            elif chunk.model_extra.get("dimple") is not None:
                step_chunks += 1
        text = "".join(pieces)
        expect(text == want["text"], f"{name}: streamed text {text!r} != gRPC {want['text']!r}")
        expect(finish == want["finish_reason"], f"{name}: streamed finish_reason {finish!r}")
        expect(step_chunks == want["steps"],
               f"{name}: {step_chunks} step chunks for {want['steps']} forward passes")
        checks += 1

    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "text", "text": "What is it?"}]}])
        fail("a remote image URL was accepted")
    except openai.BadRequestError as e:
        expect(e.status_code == 400, f"status {e.status_code}")
        err = e.body if isinstance(e.body, dict) else {}
        err = err.get("error", err)
        expect("remote URLs" in err.get("message", ""), f"error body {e.body!r}")
        expect(err.get("code") == "INVALID_ARGUMENT", f"error body {e.body!r}")
    checks += 1

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100000)
        fail("max_tokens above the limit was accepted")
    except openai.BadRequestError as e:
        expect("max_new_tokens" in str(e), f"error {e}")
    checks += 1

    anonymous = openai.OpenAI(base_url=base_url, api_key="not-a-key", max_retries=0)
    try:
        anonymous.models.list()
        fail("a wrong key was accepted")
    except openai.AuthenticationError as e:
        expect(e.status_code == 401, f"status {e.status_code}")
    checks += 1

    print(f"ok: {checks} checks with openai {openai.__version__}")


if __name__ == "__main__":
    main()
