"""The sampler draws from the distribution the parameters define."""

from __future__ import annotations

import math

import pytest
import torch

from engine_service.sampler import Sampler, SamplingRow
from engine_service.sampling_params import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]


def _frequencies(params: SamplingParams, draws: int = 4000) -> list[float]:
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([math.log(p) for p in PROBS] + [-1e9] * 4).repeat(draws, 1)
    tokens, finite = sampler(logits, [SamplingRow(params, None)] * draws)
    assert all(finite)
    return [tokens.count(i) / draws for i in range(8)]


def test_temperature_one_follows_the_softmax():
    freq = _frequencies(SamplingParams(temperature=1.0))
    for got, want in zip(freq, PROBS + [0.0] * 4, strict=True):
        assert abs(got - want) < 0.03


@pytest.mark.parametrize(
    "params,allowed",
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.6), {0, 1}),  # mass before token 2 is 0.8 >= 0.6
        (SamplingParams(min_p=0.5), {0, 1}),  # floor 0.25: token 1 (0.3) stays, token 2 (0.15) goes
    ],
)
def test_filters_restrict_and_renormalise(params, allowed):
    freq = _frequencies(params)
    assert {i for i, f in enumerate(freq) if f > 0} == allowed
    total = sum(PROBS[i] for i in allowed)
    for i in allowed:
        assert abs(freq[i] - PROBS[i] / total) < 0.04


def test_low_temperature_sharpens_and_greedy_takes_argmax():
    """A temperature below GREEDY_EPS is greedy too, not a division by almost 0: greedy only at exactly 0 drew
    among tied logits at 1e-6, and 1e-300 (0 in float32) made the probabilities NaN. Greedy takes the first of
    tied maxima, every time."""
    assert _frequencies(SamplingParams(temperature=0.2))[0] > 0.9
    assert _frequencies(SamplingParams(temperature=0.0), draws=50)[0] == 1.0
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False)
    tied = torch.tensor([[5.0, 5.0, 1.0, 0.0]]).repeat(64, 1)
    for temperature in (1e-6, 1e-300):
        params = SamplingParams(temperature=temperature)
        assert params.greedy, temperature
        tokens, finite = sampler(tied.clone(), [SamplingRow(params, None)] * 64)
        assert all(finite) and tokens == [int(tied[0].argmax())] * 64, (temperature, sorted(set(tokens)))


def test_top_p_drops_the_token_whose_mass_before_it_reaches_top_p_exactly():
    """top_p keeps the smallest set of tokens whose mass reaches top_p: a token with exactly top_p of mass before
    it goes. Four equal logits give exact float32 quarters, so top_p 0.5 keeps 2 tokens and 0.25 keeps 1; a strict
    comparison kept one more."""
    from engine_service.sampler import _top_k_top_p

    vocab, top_p = 4, [0.5, 0.25]
    out = _top_k_top_p(torch.zeros(2, vocab), torch.full((2, 1), float(vocab)), torch.tensor(top_p)[:, None])
    assert torch.isfinite(out).sum(dim=-1).tolist() == [round(p * vocab) for p in top_p]


def test_min_p_keeps_the_tokens_at_the_floor():
    """min_p drops the tokens strictly below min_p times the largest probability. Dropping those at the floor too,
    min_p=1.0 zeroed every token (the draw fell to the last vocabulary id), and with probabilities 0.5, 0.25, 0.25
    min_p=0.5 (a floor of exactly 0.25) kept only the first."""
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(16, 1)
    tokens, _ = sampler(logits, [SamplingRow(SamplingParams(min_p=1.0), None)] * 16)
    assert tokens == [0] * 16
    probs, draws = [0.5, 0.25, 0.25], 2000
    logits = torch.tensor([[math.log(p) for p in probs]]).repeat(draws, 1)
    tokens, _ = sampler(logits, [SamplingRow(SamplingParams(min_p=0.5), None)] * draws)
    for i, p in enumerate(probs):
        assert abs(tokens.count(i) / draws - p) < 0.04, (i, tokens.count(i))


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_a_row_with_only_a_frequency_or_presence_penalty_is_penalised_alone_in_its_step(penalty):
    """The pass over the output counts is skipped in a step where no row has a presence or frequency penalty;
    it was skipped where none had a presence penalty, so a row with only a frequency penalty, alone in its step,
    was not penalised at all and kept repeating its token."""
    from engine_service.penalties import Penalties
    from engine_service.sequence import Sequence, Status

    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False,
                      penalties=Penalties(1, 4, torch.device("cpu")))
    params = SamplingParams(temperature=0.0, max_tokens=8, **{penalty: 2.0})
    seq = Sequence("a", [3], params, 64)
    seq.token_ids += [0, 0]  # token 0 generated twice
    seq.status = Status.RUNNING
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    counts = torch.tensor([2.0, 0.0, 0.0, 0.0])
    want = logits[0] - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    assert int(want.argmax()) != int(logits[0].argmax())  # the penalty changes the greedy token
    tokens, _ = sampler(logits.clone(), [SamplingRow(params, None, penalty_slot=sampler.penalties.slot(seq))])
    assert tokens == [int(want.argmax())]


def test_seeded_rows_use_their_own_generator():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(3, 100)
    p = SamplingParams(temperature=1.0, seed=5)

    def draw(position: int) -> int:
        g = torch.Generator().manual_seed(5)
        rows = [SamplingRow(SamplingParams(), None)] * 3
        rows[position] = SamplingRow(p, g)
        return sampler(logits.clone(), rows)[0][position]

    assert draw(0) == draw(2) == draw(1)


def test_non_finite_rows_are_reported():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    logits[2, 0] = float("inf")
    _, finite = sampler(logits, [SamplingRow(SamplingParams(temperature=0.0), None)] * 3)
    assert finite == [True, False, False]


def test_fp16_logits_of_a_large_vocabulary_are_finite():
    """A float16 sum over 151,936 logits overflows; finiteness must not be judged by it."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.full((2, 151_936), -5.0, dtype=torch.float16)
    logits[1, 7] = float("nan")
    _, finite = sampler(logits, [SamplingRow(SamplingParams(temperature=0.0), None)] * 2)
    assert finite == [True, False]


def test_top_p_one_keeps_every_token_beside_a_filtering_row():
    from engine_service.sampler import _top_k_top_p

    logits = torch.randn(2, 150_000, generator=torch.Generator().manual_seed(0))
    vocab = torch.full((2, 1), 150_000.0)
    out = _top_k_top_p(logits.clone(), top_k=vocab, top_p=torch.tensor([[1.0], [0.5]]))
    assert torch.isfinite(out[0]).all()  # no tail token lost to float32 cumsum rounding
    assert torch.isinf(out[1]).any()


def test_seed_out_of_range_names_the_field():
    """Seeds are int64 on both protos: 2**63, the first seed that does not fit, is refused here (else it failed only
    later, serialising the engine request), and 2**63 - 1 is taken."""
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    for seed in (2**63, 2**64):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 5])
def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_does(top_k):
    """A rank cut kept an arbitrary few of the tokens tied with the k-th largest logit (and torch.sort is not
    stable, so which ones was not even defined); transformers' TopKLogitsWarper keeps them all."""
    from transformers.generation.logits_process import TopKLogitsWarper

    from engine_service.sampler import _top_k_top_p

    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0, -1.0], [0.5, 1.0, 1.0, -2.0, 1.0, 0.5]])
    ours = _top_k_top_p(logits.clone(), torch.full((2, 1), float(top_k)), torch.ones(2, 1))
    theirs = TopKLogitsWarper(top_k)(torch.zeros(2, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), (ours, theirs)
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(theirs)])  # kept logits unchanged


@pytest.mark.parametrize("samples", [True, False], ids=["rank 0", "a tensor-parallel worker"])
def test_warm_up_runs_on_every_rank_and_draws_no_ones_tokens(samples):
    """The start-up warm-up sampled penalised rows on every rank, but only the sampling rank holds penalty
    slots: a tensor-parallel engine on CUDA would have failed to start on its workers."""
    from engine_service.penalties import Penalties

    penalties = Penalties(6, 50, torch.device("cpu")) if samples else None
    sampler = Sampler(torch.device("cpu"), seed=3, triton_sampling=False, penalties=penalties)
    before = sampler.generator.get_state()
    sampler.warm_up(torch.randn(6, 50))
    assert torch.equal(sampler.generator.get_state(), before)
    if samples:
        assert int(penalties.output_counts.sum()) == 6  # every slot was used once


def test_a_biased_row_does_not_change_the_tokens_of_the_rows_beside_it():
    """A step with a biased row sampled every row from float32 logits: a penalised bf16 row, whose penalty rounds to
    a tie in bf16, took another token beside a biased row than alone."""
    from engine_service.penalties import Penalties
    from engine_service.sequence import Sequence

    def first_token(beside_a_biased_row: bool) -> int:
        sampler = Sampler(torch.device("cpu"), seed=0, penalties=Penalties(4, 8, torch.device("cpu")))
        p = SamplingParams(temperature=0.0, repetition_penalty=1.3)
        row = torch.full((8,), -5.0)
        row[0], row[1] = 2.0, 1.5390625  # token 0 is in the prompt: 2.0 / 1.3 rounds to 1.5390625 in bf16, a tie
        logits, rows = [row], [SamplingRow(p, None, penalty_slot=sampler.penalties.slot(Sequence("a", [0], p, 64)))]
        if beside_a_biased_row:
            biased = SamplingParams(temperature=0.0, logit_bias={3: 1.0})
            logits.append(torch.zeros(8))
            rows.append(SamplingRow(biased, None, bias=sampler.bias_tensors(biased)))
        return int(sampler.sample(torch.stack(logits).to(torch.bfloat16), rows)[0, 0])

    assert first_token(True) == first_token(False)


def test_a_forcing_bias_on_a_top_fp16_logit_does_not_overflow():
    """65,450 + 100 is past fp16's largest finite value: written back, the logit became inf and the row drew the
    last token of the vocabulary while reported finite."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.zeros((1, 64), dtype=torch.float16)
    logits[0, 3] = 65450.0
    tokens, finite = sampler(logits, [SamplingRow(SamplingParams(temperature=1.0, logit_bias={3: 100.0}), None)])
    assert tokens == [3] and finite == [True]


def test_top_logprobs_are_a_stable_sort_of_the_row_ties_by_id():
    """top_logprobs is the first k of a stable descending sort (equal values: the lower id first, and kept at the
    k-th place), with many ties, -inf entries and k from 0 to the row's length."""
    from engine_service.sampler import top_logprobs

    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        m, vocab = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        k = int(torch.randint(0, min(vocab, 21) + 1, (1,), generator=g))
        x = torch.randint(-3, 3, (m, vocab), generator=g).double()
        if trial % 4 == 0:
            x[x == -3] = -math.inf
        values, ids = top_logprobs(x, k)
        want = x.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(values, want.values[:, :k]) and torch.equal(ids, want.indices[:, :k]), (x, k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the triton interpreter, on the NaN rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("triton_sampling,temperature", [(False, 0.0), (False, 0.8), (True, 0.8)])
def test_large_finite_logits_are_finite(dtype, triton_sampling, temperature):
    """Finiteness is judged entry by entry: a float32 sum of a row of logits near 1e35 overflowed, and the sampler
    called the row non-finite (its request failed with 'NaN or infinite logits'). NaN and infinities still fail."""
    if triton_sampling:
        from tests.support import require_triton_interpreter

        require_triton_interpreter()
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=triton_sampling)
    logits = torch.full((4, 4096), 1.0e35, dtype=dtype)
    logits[:, 7] = 2.0e35
    logits[1, 100] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, 9] = float("-inf")
    params = SamplingParams(temperature=temperature)
    tokens, finite = sampler(logits, [SamplingRow(params, None)] * 4)
    assert finite == [True, False, False, False]
    assert (sampler.kernels is not None) == triton_sampling
    if temperature == 0.0:
        assert tokens[0] == 7


def test_a_draw_of_exactly_zero_never_takes_a_zero_probability_token(monkeypatch):
    """uniform_ returns exactly 0.0 once in 2**24 float32 draws: that u must still land on a kept token (the first
    with a non-empty interval of the cdf), never on token 0 filtered out by top-k, top-p or min-p."""
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *args, **kwargs: self.zero_())
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]]).repeat(3, 1)
    rows = [SamplingRow(SamplingParams(top_k=1), None), SamplingRow(SamplingParams(top_p=0.5), None),
            SamplingRow(SamplingParams(min_p=0.9), None)]
    tokens, finite = sampler(logits, rows)
    assert all(finite) and tokens == [2, 2, 2]
