"""The services' performance knobs: the engine's torch thread default and the detokenizer's fast decoder."""

from __future__ import annotations

import pytest

from engine_service.server import torch_threads
from engine_service.server_config import parse_config


@pytest.mark.parametrize(
    ("flags", "cuda", "cores", "expected"),
    [
        ([], False, 2, 1),  # small CPU machine: one thread, the gRPC threads and the tokenizer get the rest
        ([], False, 32, None),  # big CPU machine: torch's own choice
        (["--device", "cpu"], True, 2, 1),
        ([], True, 2, None),  # auto on a GPU machine
        (["--torch-threads", "3"], False, 2, 3),  # the flag wins
    ],
)
def test_torch_threads_default_and_flag(flags, cuda, cores, expected):
    config = parse_config(["--model", "m", *flags], env={})
    assert torch_threads(config, cuda_available=cuda, num_cores=cores) == expected


def test_torch_threads_reads_the_environment_and_refuses_negatives():
    assert parse_config(["--model", "m"], env={"ENGINE_TORCH_THREADS": "2"}).torch_threads == 2
    with pytest.raises(ValueError, match="torch_threads"):
        parse_config(["--model", "m", "--torch-threads", "-1"], env={})


def test_fast_decoder_gives_the_same_text_as_transformers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenizer_service.text_stream import TextStream, decoder_of

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<eos>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)
    assert decoder_of(fast) is fast.backend_tokenizer
    ids = [3, 0, 5, 63, 1]
    for skip in (True, False):
        assert decoder_of(fast).decode(ids, skip_special_tokens=skip) == fast.decode(ids, skip_special_tokens=skip)
        stream = TextStream(fast, (), skip, False)
        assert "".join(stream.feed([i]) for i in ids) + stream.finish() == fast.decode(ids, skip_special_tokens=skip)
    fast.clean_up_tokenization_spaces = True  # transformers would post-process: keep its decode
    assert decoder_of(fast) is fast
