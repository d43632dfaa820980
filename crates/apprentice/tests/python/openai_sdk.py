"""Drives the apprentice gateway with the official `openai` package, unmodified.

Usage: python openai_sdk.py BASE_URL EPISODE_ID
Prints one JSON object with what the SDK saw, for the Rust test to check against the store.
"""
import json
import sys

import openai

base_url, episode_id = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="not-needed")

# Plain call: structured template arguments go in content, apprentice fields in extra_body.
completion = client.chat.completions.create(
    model="function::act",
    messages=[{"role": "user", "content": [{"type": "template", "name": "user", "arguments": {"observation": "a red ball"}}]}],
    extra_body={"episode_id": episode_id, "tags": {"client": "openai-python"}},
)

# Streaming call in the same episode, episode id through a header this time.
stream = client.chat.completions.create(
    model="function::act",
    messages=[{"role": "user", "content": {"observation": "a blue key"}}],
    stream=True,
    stream_options={"include_usage": True},
    extra_headers={"x-apprentice-episode-id": episode_id},
)
streamed_text, streamed_id, usage = "", None, None
for chunk in stream:
    streamed_id = chunk.id
    if chunk.choices and chunk.choices[0].delta.content:
        streamed_text += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens

# A direct model call, and an error the SDK must surface as an exception.
direct = client.chat.completions.create(model="model::echo", messages=[{"role": "user", "content": "ping"}])
try:
    client.chat.completions.create(model="function::missing", messages=[{"role": "user", "content": "x"}])
    error_status = None
except openai.NotFoundError as e:
    error_status = e.status_code

print(json.dumps({
    "plain_id": completion.id,
    "plain_text": completion.choices[0].message.content,
    "plain_usage": completion.usage.total_tokens,
    "streamed_id": streamed_id,
    "streamed_text": streamed_text,
    "streamed_usage": usage,
    "direct_text": direct.choices[0].message.content,
    "error_status": error_status,
    "sdk_version": openai.__version__,
}))
