"""The official `openai` Python client against `meet serve` (run by scripts/check-openai-client.sh):
streaming and non-streaming chat, with and without a control (`extra_body`), and the model-name
suffix. Prints one line per request and exits non-zero on any failure."""
import sys

from openai import OpenAI, AuthenticationError

base_url, api_key, control = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=api_key)
messages = [{"role": "user", "content": "Write one sentence about the sea."}]
models = [m.id for m in client.models.list().data]
print(f"models: {models}")
assert f"meet:{control}" in models, models

def show(label, text, finish):
    print(f"{label:<32} finish={finish:<6} {text!r}")
    assert text, label

for extra in (None, {"control": control}):
    label = "control=" + control if extra else "no control"
    r = client.chat.completions.create(model="meet", messages=messages, max_tokens=24, temperature=0,
                                       extra_body=extra)
    show(f"chat, {label}", r.choices[0].message.content, r.choices[0].finish_reason)
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    plain = r.choices[0].message.content
    stream = client.chat.completions.create(model="meet", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, extra_body=extra)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    show(f"chat stream, {label}", "".join(pieces), finish)
    assert "".join(pieces) == plain, "streamed text differs from the non-streamed one"
    if extra:
        with_control = plain
    else:
        without_control = plain

r = client.chat.completions.create(model=f"meet:{control}", messages=messages, max_tokens=24, temperature=0)
show(f"chat, model=meet:{control}", r.choices[0].message.content, r.choices[0].finish_reason)
assert r.choices[0].message.content == with_control
print("the control changes the reply:", with_control != without_control)

try:
    OpenAI(base_url=base_url, api_key="wrong").models.list()
    raise SystemExit("a wrong key was accepted")
except AuthenticationError as e:
    print(f"wrong key: HTTP {e.status_code} {e.body['code']}")
print("openai client: all requests passed")
