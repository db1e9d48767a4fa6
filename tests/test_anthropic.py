"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) spoken to by the official
`anthropic` client: answers equal the model's own greedy decoding of the same conversation, the
stream's event types in order, stop sequences, tool use (forced and returned), usage, and every bad
body a 400 in Anthropic's error shape with the server still up."""

import json

import pytest
import torch

anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from camelid import LlamaForCausalLM  # noqa: E402
from camelid.serve.app import create_app  # noqa: E402
from netutil import AppServer  # noqa: E402

KEY = "sk-ant-test"
T0 = {"temperature": 0}  # the 2026 client has no sampling arguments: sent as extra fields, as the API reads them
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def server(model, smollm2_tokenizer):
    s = AppServer(create_app(model, smollm2_tokenizer, model_name="smollm2", api_key=KEY, max_batch=4))
    yield s
    s.close()


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def greedy_text(model, tok, messages, n, prefill=""):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    if prefill:
        ids = ids + tok.encode(prefill, add_special_tokens=False, parse_special=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=tok.eos_token_ids)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special_tokens=True), len(ids), new


def test_a_message_equals_greedy_decoding_of_the_conversation(client, model, smollm2_tokenizer):
    system, user = "You answer in one short sentence.", "What is the capital of France?"
    want, n_in, new = greedy_text(model, smollm2_tokenizer, [{"role": "system", "content": system},
                                                             {"role": "user", "content": user}], 24)
    m = client.messages.create(model="smollm2", max_tokens=24, extra_body=T0, system=system,
                               messages=[{"role": "user", "content": user}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == "smollm2"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == want
    ends = new[-1] in smollm2_tokenizer.eos_token_ids
    assert m.stop_reason == ("end_turn" if ends else "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens == n_in and m.usage.output_tokens == len(new)


def test_multi_turn_with_blocks_and_a_prefilled_answer(client, model, smollm2_tokenizer):
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a fruit."}]}]
    want, _, _ = greedy_text(model, smollm2_tokenizer, [dict(t, content=t["content"] if isinstance(t["content"], str)
                                                             else "Name a fruit.") for t in turns], 12, prefill="I pick")
    m = client.messages.create(model="smollm2", max_tokens=12, extra_body=T0,
                               messages=turns + [{"role": "assistant", "content": "I pick"}])
    assert m.content[0].text == want  # the continuation only, as Anthropic answers a prefill


def test_streaming_sends_the_event_types_in_order(client, model, smollm2_tokenizer):
    user = "Write one sentence about the sea."
    want, n_in, new = greedy_text(model, smollm2_tokenizer, [{"role": "user", "content": user}], 20)
    kinds, text = [], ""
    with client.messages.stream(model="smollm2", max_tokens=20, extra_body=T0,
                                messages=[{"role": "user", "content": user}]) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta":
                assert event.delta.type == "text_delta"
                text += event.delta.text
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]
    raw = [json.loads(line[6:])["type"] for line in httpx.post(  # the helper hides ping and adds "text" events
        client.base_url.join("/v1/messages").__str__(), headers={"x-api-key": KEY}, timeout=60, json={
            "model": "smollm2", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": user}],
            **T0}).text.splitlines() if line.startswith("data: ")]
    assert raw[:3] == ["message_start", "content_block_start", "ping"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[3:-3]) == {"content_block_delta"} and len(raw) - 6 >= 2
    assert text == want == final.content[0].text
    assert final.usage.output_tokens == len(new) and final.usage.input_tokens == n_in


def test_stop_sequences_end_the_answer_and_are_named(client, model, smollm2_tokenizer):
    user = "List the days of the week."
    full, _, _ = greedy_text(model, smollm2_tokenizer, [{"role": "user", "content": user}], 40)
    stop = "Wednesday"
    assert stop in full
    m = client.messages.create(model="smollm2", max_tokens=40, extra_body=T0, stop_sequences=["zebra", stop],
                               messages=[{"role": "user", "content": user}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[:full.index(stop)]


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_a_forced_tool_call_comes_back_as_a_tool_use_block(client, choice):
    m = client.messages.create(model="smollm2", max_tokens=60, extra_body=T0, tools=[WEATHER], tool_choice=choice,
                               messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert m.stop_reason == "tool_use"
    (block,) = m.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    assert set(block.input) == {"city"} and isinstance(block.input["city"], str)


def test_a_tool_call_streams_as_input_json_and_its_result_goes_back(client, model, smollm2_tokenizer):
    with client.messages.stream(model="smollm2", max_tokens=60, extra_body=T0, tools=[WEATHER],
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "content_block_start" in kinds and kinds[-1] == "message_stop"
    (call,) = final.content
    assert call.type == "tool_use" and final.stop_reason == "tool_use" and "city" in call.input
    # the result of the call, back as a tool_result block: the model answers in text
    m = client.messages.create(model="smollm2", max_tokens=30, extra_body=T0, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]}])
    assert m.content and m.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_count_tokens_is_the_rendered_prompt_length(client, smollm2_tokenizer):
    msgs = [{"role": "user", "content": "Hello there"}]
    r = client.messages.count_tokens(model="smollm2", system="Be brief.", messages=msgs)
    want = smollm2_tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs,
                                                 add_generation_prompt=True)
    assert r.input_tokens == len(want)


def _post(server, body, path="/v1/messages"):
    return httpx.post(server.url + path, json=body, headers={"x-api-key": KEY}, timeout=60)


GOOD = {"model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("name, change, param", [
    ("system role in messages", {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]},
     "messages.0.role: must be 'user' or 'assistant'"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("no role", {"messages": [{"content": "x"}]}, "messages.0.role"),
    ("empty string content", {"messages": [{"role": "user", "content": ""}]}, "messages.0.content: must be non-empty"),
    ("empty block list", {"messages": [{"role": "user", "content": []}]}, "messages.0.content: must be non-empty"),
    ("empty text block among others", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": ""}]}]}, "messages.0.content.1.text"),
    ("empty messages", {"messages": []}, "messages: must be a non-empty list"),
    ("tool_use from the user", {"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "messages.0.content.0.type"),
    ("image", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image blocks"),
    ("trailing space prefill", {"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Sure "}]}, "trailing whitespace"),
    ("missing max_tokens", {"max_tokens": None}, "max_tokens: Field required"),
    ("zero max_tokens", {"max_tokens": 0}, "max_tokens: must be an integer of at least 1"),
    ("negative max_tokens", {"max_tokens": -5}, "max_tokens: must be an integer"),
    ("string max_tokens", {"max_tokens": "8"}, "max_tokens: must be an integer"),
    ("float max_tokens", {"max_tokens": 8.5}, "max_tokens: must be an integer"),
    ("bool max_tokens", {"max_tokens": True}, "max_tokens: must be an integer"),
    ("huge max_tokens", {"max_tokens": 10**9}, "exceeds this server's limit"),
    ("temperature above 1", {"temperature": 1.5}, "'temperature' must be a number in [0, 1]"),
    ("stop_sequences string", {"stop_sequences": "x"}, "stop_sequences: must be a list"),
    ("bad system", {"system": [{"type": "image"}]}, "system: must be a string or a list of text blocks"),
    ("tool without schema", {"tools": [{"name": "f"}]}, "tools.0: a tool needs a name and an input_schema"),
    ("tool_choice without tools", {"tool_choice": {"type": "any"}}, "tool_choice: needs 'tools'"),
])
def test_bad_message_bodies_get_anthropic_shaped_400s(server, name, change, param):
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    r = _post(server, body)
    assert r.status_code == 400, (name, r.text)
    e = r.json()
    assert e["type"] == "error" and e["error"]["type"] == "invalid_request_error" and param in e["error"]["message"]
    assert _post(server, GOOD).status_code == 200  # still up


def test_the_client_raises_its_own_errors(client, server):
    with pytest.raises(anthropic.BadRequestError, match="messages.0.role"):
        client.messages.create(model="smollm2", max_tokens=8, messages=[{"role": "system", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="smollm2", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(server.url + "/v1/messages", content=b"{not json", headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert json.loads(_post(server, GOOD, "/v1/messages/count_tokens").text)["input_tokens"] > 0
