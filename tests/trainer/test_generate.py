import pytest
import torch

from trainer.config import PRESETS
from trainer.errors import ConfigError
from trainer.generate import TextStream, generate
from trainer.model import Transformer
from trainer.tokenizer import train_bpe


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).eval()


def test_greedy_is_argmax_of_full_forward(model):
    prompt = [5, 17, 42, 7]
    out = generate(model, prompt, 12, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_sampling_is_reproducible_with_a_seed(model):
    a = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    c = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, top_k=50, seed=8)
    assert a == b and a != c


def test_sampling_without_a_seed_leaves_the_global_rng_alone(model):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, [1, 2, 3], 20, temperature=1.0)
    b = generate(model, [1, 2, 3], 20, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), before)
    assert a != b  # each unseeded call draws its own seed


def test_top_k_one_is_greedy(model):
    assert generate(model, [3, 4], 10, temperature=1.5, top_k=1, seed=1) == generate(
        model, [3, 4], 10
    )


def test_stop_ids_end_generation(model):
    greedy = generate(model, [9, 9], 10)
    stopped = generate(model, [9, 9], 10, stop_ids=[greedy[3]])
    assert stopped == greedy[: greedy.index(greedy[3])]


def test_context_limit_names_the_numbers(model):
    with pytest.raises(
        ConfigError,
        match=r"prompt \(10 tokens\) \+ max_tokens \(250\) = 260 exceeds the model's context of 256",
    ):
        generate(model, list(range(10)), 250)
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(model, [], 5)


def test_text_stream_never_emits_half_a_character():
    tok = train_bpe(iter(["plain ascii words only " * 20]), 300)
    text = "naïve 中文 🙂 done"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
