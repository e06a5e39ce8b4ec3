"""Talk to a running server with the official ``openai`` client.

Start the server first (``make run``), then::

    .venv/bin/python examples/openai_client.py [http://127.0.0.1:8080/v1]
"""

from __future__ import annotations

import sys

from openai import OpenAI


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="not-needed-offline")
    model = client.models.list().data[0].id
    print(f"model: {model}")

    question = [{"role": "user", "content": "Say hello to the pipeline."}]
    stream = client.chat.completions.create(
        model=model, messages=question, stream=True, stream_options={"include_usage": True},
    )
    streamed = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                streamed.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\nusage: {chunk.usage.total_tokens} tokens")

    whole = client.chat.completions.create(model=model, messages=question)
    same = whole.choices[0].message.content == "".join(streamed)
    print(f"non-streamed answer is the same: {same}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1")
