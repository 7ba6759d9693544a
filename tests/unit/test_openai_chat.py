"""Chat templates render exactly as transformers' apply_chat_template; the default format is the documented one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound
from services.gateway.domain import VersionInfo
from services.gateway.openai_chat import ChatTemplate, ChatTemplates, default_prompt, template_source

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Where does the river go?  "},
    {"role": "assistant", "content": "To the sea."},
    {"role": "user", "content": "And then? {{ not a template }}"},
]
TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama-2-like": "{{ bos_token }}{% for m in messages %}{% if loop.index0 == 0 and m['role'] == 'system' %}"
                    "<<SYS>>{{ m['content'] | trim }}<</SYS>>{% continue %}{% endif %}"
                    "{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] }}"
                    "{{ eos_token }}{% endif %}\n{% endfor %}",
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ eos_token }}",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modelgrid.model import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("chat"), "llama", num_layers=1, hidden_size=32,
                                   num_heads=4, vocab_size=512)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendering_matches_transformers(checkpoint: Path, name: str) -> None:
    from transformers import AutoTokenizer

    config = {**json.loads((checkpoint / "tokenizer_config.json").read_text()), "chat_template": TEMPLATES[name]}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    expected = AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)
    ours = ChatTemplate.compile(template_source(config, None), config, "test v1").render(MESSAGES)
    assert ours == expected


def test_template_sources() -> None:
    assert template_source({"chat_template": "A"}, None) == "A"
    assert template_source({"chat_template": "A"}, "B") == "B"  # chat_template.jinja wins
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert template_source({"chat_template": named}, None) == "D"
    assert template_source({"chat_template": "  "}, None) is None
    assert template_source({}, None) is None


def test_the_default_format() -> None:
    assert default_prompt(MESSAGES[:2]) == "system: Be brief.\nuser:   Where does the river go?  \nassistant:"


def test_a_broken_template_and_a_refusing_template_give_clear_errors() -> None:
    with pytest.raises(FailedPrecondition, match="does not compile"):
        ChatTemplate.compile("{% for m in messages %}", {}, "m v1")
    strict = ChatTemplate.compile("{{ raise_exception('roles must alternate') }}", {}, "m v1")
    with pytest.raises(InvalidArgument, match="roles must alternate"):
        strict.render(MESSAGES)
    sandboxed = ChatTemplate.compile("{{ messages.__class__.__mro__ }}", {}, "m v1")
    with pytest.raises(InvalidArgument):
        sandboxed.render(MESSAGES)


def test_templates_are_fetched_once_per_version_and_missing_files_mean_none() -> None:
    files = {"tokenizer_config.json": json.dumps({"chat_template": "{{ bos_token }}x", "bos_token": "<s>"}).encode()}
    fetched: list[str] = []

    async def fetch(model: str, version: str, path: str) -> bytes:
        fetched.append(path)
        if model == "b" or path not in files:
            raise NotFound(path)
        return files[path]

    def version(name: str, names: tuple[str, ...]) -> VersionInfo:
        return VersionInfo(name, "v1", "llama", "decoder", 512, 64, files=names)

    async def run() -> None:
        templates = ChatTemplates(fetch)
        with_template = version("a", ("tokenizer_config.json",))
        assert (await templates.get(with_template)).render([]) == "<s>x"
        assert (await templates.get(with_template)).render([]) == "<s>x"
        assert fetched == ["tokenizer_config.json"]  # chat_template.jinja is not in the version's files
        assert await templates.get(version("b", ())) is None  # no file list: both asked, neither there
        assert fetched[1:] == ["chat_template.jinja", "tokenizer_config.json"]

    asyncio.run(run())
