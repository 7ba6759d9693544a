"""Gateway tokenizers: incremental detokenization (multi-byte characters), BOS handling like transformers."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from services.gateway.tokenizers import Detokenizer, ModelTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: café, naïve, façade, déjà vu.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 🙂🚀🎉 and math: ∑ x² ≤ ∞ — done…",
    "Numbers 3.14159 and 2718281828, tabs\tand newlines\n",
]


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A small byte-level BPE: multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def pieces(detok: Detokenizer, ids: list[int]) -> list[str]:
    out = [detok.add(i) for i in ids]
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("text", CORPUS + ["ẞ𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧‍👦 mixed ascii"])
def test_pieces_concatenate_to_decode(byte_bpe: Tokenizer, text: str) -> None:
    ids = byte_bpe.encode(text, add_special_tokens=False).ids
    out = pieces(Detokenizer(byte_bpe), ids)
    assert "".join(out) == byte_bpe.decode(ids) == text
    assert not any("\ufffd" in p for p in out), out  # no half characters were streamed


def test_multibyte_character_is_held_until_complete(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("🚀", add_special_tokens=False).ids
    assert len(ids) > 1  # a 4-byte character over several byte-level tokens
    detok = Detokenizer(byte_bpe)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🚀"]


def test_random_ids_including_invalid_utf8(byte_bpe: Tokenizer) -> None:
    """Whatever a random model samples (lone continuation bytes too), the pieces add up to decode()."""
    rng = random.Random(0)
    vocab = byte_bpe.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
        assert "".join(pieces(Detokenizer(byte_bpe), ids)) == byte_bpe.decode(ids)


def test_special_tokens_add_no_text(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("café", add_special_tokens=False).ids
    out = pieces(Detokenizer(byte_bpe), [*ids[:1], 2, *ids[1:]])
    assert "".join(out) == "café"


def test_prompt_context_keeps_spacing_of_sentencepiece_style_tokenizers() -> None:
    """Metaspace decoders drop the first token's leading space; with the prompt as context it stays."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz"), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    prompt = tok.encode("The quick brown").ids
    new = tok.encode("The quick brown fox jumps over").ids[len(prompt):]
    model_tok = ModelTokenizer(tok, bos_id=None, add_bos=False, pad_id=0)
    text = "".join(pieces(model_tok.detokenizer(prompt), new))
    assert text == " fox jumps over"
    assert "".join(pieces(Detokenizer(tok), new)) == tok.decode(new) == "fox jumps over"


def test_bos_follows_the_tokenizer_json_template(byte_bpe: Tokenizer) -> None:
    with_template = ModelTokenizer.from_files(byte_bpe.to_str(), {"bos_token": "<s>"}, {})
    assert with_template.encode("hi")[0] == 1
    plain = Tokenizer.from_str(byte_bpe.to_str())
    plain.post_processor = None
    no_template = ModelTokenizer.from_files(plain.to_str(), {"bos_token": "<s>"}, {})
    assert no_template.encode("hi")[0] != 1
    # tokenizer_config says add_bos_token: the BOS token is prepended once
    forced = ModelTokenizer.from_files(plain.to_str(), {"bos_token": {"content": "<s>"}, "add_bos_token": True}, {})
    assert forced.encode("hi") == [1, *no_template.encode("hi")]
    both = ModelTokenizer.from_files(byte_bpe.to_str(), {"bos_token": "<s>", "add_bos_token": True}, {})
    assert both.encode("hi") == with_template.encode("hi")
    # the BOS id may come from config.json when tokenizer_config names none
    from_config = ModelTokenizer.from_files(plain.to_str(), {"add_bos_token": True}, {"bos_token_id": 1})
    assert from_config.encode("hi")[0] == 1


def test_encoder_truncation_and_padding_settings_of_tokenizer_json_are_replaced(byte_bpe: Tokenizer) -> None:
    tok = Tokenizer.from_str(byte_bpe.to_str())
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=64)
    tok.enable_truncation(max_length=3)
    model_tok = ModelTokenizer.from_files(tok.to_str(), {}, {}, truncate_to=8)
    rows = model_tok.encode_batch(["a", CORPUS[0]])
    assert len(rows[0]) == 2 and len(rows[1]) == 8  # no padding; truncated to 8 with the BOS kept
    assert rows[1][0] == 1
    assert model_tok.pad_id == 0


def test_matches_transformers_on_a_synthetic_checkpoint_tokenizer(tmp_path) -> None:
    """Prompt ids are what transformers' AutoTokenizer gives for the same files."""
    transformers = pytest.importorskip("transformers")
    synthetic = pytest.importorskip("modelgrid.model.synthetic")
    synthetic._write_tokenizer(tmp_path, 512, 2048, bos=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ModelTokenizer.from_files(
        (tmp_path / "tokenizer.json").read_text(), json.loads((tmp_path / "tokenizer_config.json").read_text()), {}
    )
    for text in ["Hello world", "Grüße 日本 🙂", " leading space", "a\nb"]:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
