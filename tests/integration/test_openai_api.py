"""The OpenAI-compatible HTTP API with the official `openai` client, against `modelgrid up` as real processes.

`modelgrid up` (Redis, registry, scheduler, 2 CPU workers, the gateway with --http-port) runs as a subprocess
(tests/e2e/test_up.py's Launcher) with a known first admin key; a random Llama (2 stages over the 2 workers),
the same Llama with a chat template in its tokenizer_config.json, and a random BERT are registered through the
SDK. Generated text is compared with transformers' greedy output; embeddings with the gRPC Embed call.

`running_platform` is shared with test_kserve_api.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import openai
import pytest

from modelgrid.client import Client
from tests.e2e.test_up import Launcher
from tests.support import free_port

pytestmark = [pytest.mark.timeout(300)]

ADMIN_KEY = "mg_openai_tests_admin_0123456789"
LLM, CHAT, BERT = "tiny-llama", "tiny-chat", "tiny-bert"
PROMPT = "The river ran past the mill"
NEW_TOKENS = 12
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the river go?"}]
# the documented default format of a model without a chat template (services/gateway/openai_chat.py)
DEFAULT_CHAT_PROMPT = "system: Be brief.\nuser: Where does the river go?\nassistant:"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unsupported role ' + m['role']) }}"
    "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
STOP_TIMEOUT_S = 60


# ---- the platform (shared with test_kserve_api.py) -------------------------------------------------

@dataclass
class Platform:
    up: Launcher
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def openai(self, api_key: str = ADMIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)

    def client(self, api_key: str = ADMIN_KEY) -> Client:
        return Client(self.up.gateway, timeout=120, api_key=api_key)


@contextmanager
def running_platform(data_dir: Path, models: Mapping[str, Path], workers: int = 2) -> Iterator[Platform]:
    """`modelgrid up` with the OpenAI API on a free port; `models` (name -> checkpoint dir) registered with
    `workers` stages each and placed before it yields. Everything is stopped (SIGTERM, then SIGKILL) after."""
    http_port = free_port()
    up = Launcher(data_dir, "--workers", str(workers), "--http-port", str(http_port), "--api-key", ADMIN_KEY)
    try:
        up.wait_ready()
        platform = Platform(up, http_port)
        with platform.client() as client:
            for name, directory in models.items():
                client.register(directory, name, stages=workers)
            deadline = time.monotonic() + 120
            for name in models:
                while not client.placement(name).ready:
                    assert time.monotonic() < deadline, f"{name} not placed:\n{up.service_logs()}"
                    time.sleep(0.1)
        yield platform
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait_exit(STOP_TIMEOUT_S) == 0, up.output()
        logs = (data_dir / "logs" / "gateway.log").read_text(errors="replace")
        assert "Traceback" not in logs, logs[-4000:]  # no request ever became an internal error
    finally:
        up.cleanup()


def http_request(platform: Platform, method: str, path: str, body: bytes | None = None,
                 api_key: str | None = ADMIN_KEY) -> tuple[int, dict[str, Any]]:
    """A raw HTTP call (no client library smoothing anything over): (status, JSON body)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(platform.base_url.removesuffix("/v1") + path, data=body, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from modelgrid.model import write_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    llama = write_random_checkpoint(root / LLM, "llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                                    vocab_size=512, seed=5, init_std=0.2, random_norms_and_biases=True)
    chat = Path(shutil.copytree(llama, root / CHAT))
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    bert = write_random_checkpoint(root / BERT, "bert", num_layers=2, hidden_size=32, num_heads=4, vocab_size=300,
                                   max_position_embeddings=64, seed=2)
    return {LLM: llama, CHAT: chat, BERT: bert}


@dataclass
class References:
    """transformers' greedy continuations (decoded as the gateway decodes: special tokens skipped)."""

    prompt_tokens: int
    text: str  # of PROMPT, NEW_TOKENS tokens
    chat_text: str  # of MESSAGES through CHAT_TEMPLATE
    chat_prompt_tokens: int
    default_chat_text: str  # of DEFAULT_CHAT_PROMPT


@pytest.fixture(scope="module")
def refs(checkpoints: dict[str, Path]) -> References:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.stack import hf_greedy_many

    tok = AutoTokenizer.from_pretrained(checkpoints[LLM])
    chat_ids = list(AutoTokenizer.from_pretrained(checkpoints[CHAT]).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])
    prompts = [tok(PROMPT)["input_ids"], chat_ids, tok(DEFAULT_CHAT_PROMPT)["input_ids"]]
    model = AutoModelForCausalLM.from_pretrained(checkpoints[LLM], dtype=torch.float32).eval()
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy_many(model, prompts, NEW_TOKENS)]
    return References(len(prompts[0]), texts[0], texts[1], len(chat_ids), texts[2])


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("platform") / "data", checkpoints) as running:
        yield running


@pytest.fixture(scope="module")
def oai(platform: Platform) -> openai.OpenAI:
    return platform.openai()


# ---- models -----------------------------------------------------------------------------------------

def test_models_are_listed_and_retrieved(oai: openai.OpenAI) -> None:
    models = oai.models.list().data
    assert sorted(m.id for m in models) == sorted([BERT, CHAT, LLM])
    assert all(m.object == "model" and m.owned_by == "modelgrid" and m.created > 0 for m in models)
    assert oai.models.retrieve(f"{LLM}:v1").id == f"{LLM}:v1"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve(f"{LLM}:v9")


# ---- completions ------------------------------------------------------------------------------------

def test_greedy_completion_matches_transformers_streamed_or_not(oai: openai.OpenAI, refs: References) -> None:
    whole = oai.completions.create(model=LLM, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert whole.choices[0].text == refs.text
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.system_fingerprint == f"{LLM}:v1"
    assert (whole.usage.prompt_tokens, whole.usage.total_tokens) == (
        refs.prompt_tokens, refs.prompt_tokens + whole.usage.completion_tokens)

    chunks = list(oai.completions.create(model=LLM, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == refs.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequences_cut_the_text(oai: openai.OpenAI, refs: References) -> None:
    cut = next(i for i in range(2, len(refs.text)) if refs.text[i].isalnum())
    stop = refs.text[cut]
    reply = oai.completions.create(model=LLM, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stop=[stop])
    assert reply.choices[0].text == refs.text[: refs.text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_are_separate_seeded_sessions(oai: openai.OpenAI, refs: References) -> None:
    """Choice i samples with seed + i: the same request gives the same choices, and choice 1 equals a
    one-choice request with seed + 1. Token-id prompts and prompt batches index choices prompt-major."""
    fields = dict(model=LLM, prompt=[1, 17, 250, 3, 99], max_tokens=8, temperature=1.0, top_p=0.95)
    first = oai.completions.create(n=3, seed=40, **fields)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in oai.completions.create(n=3, seed=40, **fields).choices] == [c.text for c in first.choices]
    assert oai.completions.create(n=1, seed=41, **fields).choices[0].text == first.choices[1].text
    assert first.usage.prompt_tokens == 5 and 3 <= first.usage.completion_tokens <= 24  # the prompt counts once

    batch = oai.completions.create(model=LLM, prompt=[PROMPT, PROMPT], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert len({c.text for c in batch.choices}) == 1  # greedy: every session says the same
    assert batch.choices[0].text and refs.text.startswith(batch.choices[0].text)  # ... which is transformers' text


def test_streamed_choices_arrive_interleaved_with_their_index(oai: openai.OpenAI) -> None:
    fields = dict(model=LLM, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=2)
    whole = oai.completions.create(**fields)
    texts = {0: "", 1: ""}
    for chunk in oai.completions.create(stream=True, **fields):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(texts.values()) and texts == {c.index: c.text for c in whole.choices}


def test_a_closed_stream_ends_its_sessions_at_once(platform: Platform, oai: openai.OpenAI) -> None:
    def generated(client: Client) -> int:  # LLM tokens generated in the gateway's last minute
        return sum(m.completion_tokens for m in client.stats().models if m.model == LLM)

    with platform.client() as client:
        before = generated(client)
        stream = oai.completions.create(model=LLM, prompt=PROMPT, max_tokens=2000, temperature=0, stream=True)
        for received, _ in enumerate(stream, 1):
            if received == 3:
                break
        stream.close()
        deadline = time.monotonic() + 15
        while (sessions := sum(w.active_sessions for w in client.workers())) or client.stats().active_streams:
            assert time.monotonic() < deadline, f"{sessions} sessions still open"
            time.sleep(0.05)
        assert 3 <= generated(client) - before < 1000  # cut short, far from max_tokens


# ---- chat -------------------------------------------------------------------------------------------

def test_chat_uses_the_models_chat_template(oai: openai.OpenAI, refs: References) -> None:
    reply = oai.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == refs.chat_text
    assert reply.usage.prompt_tokens == refs.chat_prompt_tokens

    chunks = list(oai.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == refs.chat_text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    with pytest.raises(openai.BadRequestError, match="unsupported role tool"):  # the template's raise_exception
        oai.chat.completions.create(model=CHAT, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_chat_without_a_template_uses_the_default_format(oai: openai.OpenAI, refs: References) -> None:
    reply = oai.chat.completions.create(model=LLM, messages=MESSAGES, max_completion_tokens=NEW_TOKENS, temperature=0)
    assert reply.choices[0].message.content == refs.default_chat_text


# ---- embeddings -------------------------------------------------------------------------------------

def test_embeddings_equal_the_grpc_embed(platform: Platform, oai: openai.OpenAI) -> None:
    texts = ["short", "a somewhat longer sentence about rivers and mills", "café 日本"]
    with platform.client() as client:
        expected = np.array(client.embed(BERT, texts), dtype=np.float32)
    packed = oai.embeddings.create(model=BERT, input=texts)  # the client asks for base64 and unpacks it
    plain = oai.embeddings.create(model=BERT, input=texts, encoding_format="float")
    for reply in (packed, plain):
        assert [d.index for d in reply.data] == [0, 1, 2]
        np.testing.assert_allclose(np.array([d.embedding for d in reply.data]), expected, rtol=0, atol=1e-6)
    assert plain.usage.prompt_tokens == plain.usage.total_tokens > len(texts)
    single = oai.embeddings.create(model=BERT, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, expected[0], rtol=0, atol=1e-6)


# ---- keys, limits, errors ---------------------------------------------------------------------------

def test_a_bad_key_is_refused(platform: Platform) -> None:
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        platform.openai(api_key="mg_not_a_real_key_000000").models.list()
    status, body = http_request(platform, "GET", "/v1/models", api_key=None)
    assert status == 401 and "missing API key" in body["error"]["message"]


def test_an_unknown_model_is_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="ghost"):
        oai.completions.create(model="ghost", prompt="hi")
    with pytest.raises(openai.NotFoundError, match="v9"):
        oai.chat.completions.create(model=f"{LLM}:v9", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="ghost", input="hi")


def test_a_key_over_its_limit_is_rate_limited(platform: Platform) -> None:
    with platform.client() as client:
        limited = client.create_key("openai-limited", requests_per_minute=1).secret
    oai = platform.openai(api_key=limited)
    assert oai.completions.create(model=LLM, prompt=PROMPT, max_tokens=2, temperature=0).choices
    with pytest.raises(openai.RateLimitError, match="requests per minute") as info:
        oai.completions.create(model=LLM, prompt=PROMPT, max_tokens=2, temperature=0)
    assert int(info.value.response.headers["retry-after"]) >= 1


BAD_BODIES = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", b"", 400, "missing"),
    ("/v1/completions", b'{"prompt": "hi"}', 400, "'model' is required"),
    ("/v1/completions", b'{"model": "tiny-llama"}', 400, "'prompt' is required"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": "lots"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "temperature": 7}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "n": 0}', 400, "'n'"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "stream": "maybe"}', 400, "stream"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": ""}', 400, "prompt is empty"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": [1, 99999]}', 400, "outside the vocabulary"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 4000}', 400, "context"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "stop": ["a","b","c","d","e"]}', 400, "stop"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "echo": true}', 400, "echo"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "logprobs": 2}', 400, "logprobs"),
    ("/v1/completions", b'{"model": "Bad Name", "prompt": "hi"}', 400, "model name"),
    ("/v1/completions", b'{"model": "tiny-bert", "prompt": "hi"}', 400, "encoder"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "role"),
    ("/v1/embeddings", b'{"model": "tiny-bert", "input": [1, 2, 3]}', 400, "token-id input"),
    ("/v1/embeddings", b'{"model": "tiny-bert", "input": ""}', 400, "empty"),
    ("/v1/embeddings", b'{"model": "tiny-bert", "input": "x", "dimensions": 3}', 400, "dimensions"),
    ("/v1/embeddings", b'{"model": "tiny-llama", "input": "x"}', 400, "decoder"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x" * (10 << 20)}).encode(), 413, "larger than"),
]


@pytest.mark.parametrize("path,body,status,message", BAD_BODIES, ids=[f"{p}:{m}" for p, _, _, m in BAD_BODIES])
def test_malformed_requests_get_400_or_413_with_a_message(
    platform: Platform, path: str, body: bytes, status: int, message: str
) -> None:
    got, reply = http_request(platform, "POST", path, body)
    assert got == status, reply
    error = reply["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error


def test_unknown_routes_and_the_openapi_document(platform: Platform) -> None:
    status, body = http_request(platform, "GET", "/v1/nothing")
    assert status == 404 and "no such endpoint" in body["error"]["message"]
    status, document = http_request(platform, "GET", "/openapi.json", api_key=None)
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"} <= set(document["paths"])
