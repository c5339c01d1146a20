"""The sampler draws from the distribution its parameters define: many draws through Sampler, against that
distribution computed here on its own in float64.

`_exact` writes the distribution out in docs/ENGINE.md's order (Sampling): logit_bias, penalties, the
min_tokens ban, then greedy, or temperature, top-k (every token tied with the k-th stays), top-p (the smallest
prefix of the tokens sorted by probability, ties in token-id order, whose mass reaches top_p), min-p (tokens at
min_p times the largest probability or above stay), renormalised. Where transformers defines the same thing
(not presence and frequency penalties, not the order of tied tokens at a top-p cut) it equals the
probabilities of generate()'s processors, which `test_the_reference_is_transformers_generate_where_it_is_defined`
checks. Draws are rows of one step (one uniform each), so a case of 16,000 draws costs one call. Every check
runs on fixed seeds: a bound that held by luck on one seed holds on it forever, so the bounds are set from the
statistics (a chi-square p-value of 1e-6), not from what passed.

The Triton kernels run under the interpreter here, about 10 ms a row: their cases draw 96 rows each through
Sampler, and the inverse-CDF boundaries of each token are checked directly (`sample_rows` at uniforms 1e-5 inside
both ends of every token's interval), which bounds each token's probability to 2e-5 of the exact one in a few
hundred rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from engine_service.penalties import Penalties
from engine_service.sampler import Sampler, SamplingRow
from engine_service.sampling_params import SamplingParams
from engine_service.sequence import Sequence, Status
from tests.support import require_triton_interpreter

V = 32  # vocabulary of every case: torch.sort on the CPU stops keeping ties in index order from 17 entries
FILL = -1e4  # the logit of a case's unused tokens: probability exactly 0 in float64 too (exp(-1e4) underflows)
P_VALUE = 1e-6  # a chi-square below this fails
SURE = 30.0  # a token expected this many times or more must be drawn (missed with probability e^-30)


@dataclass
class Case:
    name: str
    logits: list[float]  # the leading tokens' logits; the rest of the V are FILL
    params: SamplingParams
    dtype: torch.dtype = torch.float32
    banned: tuple[int, ...] = ()  # min_tokens' ban
    prompt: tuple[int, ...] = (0,)  # for penalties: repetition counts these, presence/frequency do not
    output: tuple[int, ...] = ()
    draws: int = 16_000
    fill: float = FILL  # a larger one than -1e37 overflows the row's float32 sum: the sampler reports it not finite

    def row(self) -> torch.Tensor:
        """The case's logits as the model hands them to the sampler, in its dtype."""
        x = torch.full((V,), self.fill, dtype=torch.float64)
        x[: len(self.logits)] = torch.tensor(self.logits, dtype=torch.float64)
        return x.to(self.dtype)


def _exact(case: Case) -> torch.Tensor:
    """The distribution the case's row must be drawn from, [V] float64 (one-hot for a greedy row)."""
    p = case.params
    x = case.row().double()
    for token, bias in p.logit_bias:  # added in float32 or wider, written back in the logits' dtype
        x[token] += bias
    x = x.to(case.dtype).double()
    if p.repetition_penalty != 1.0:
        for t in set(case.prompt + case.output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    counts = torch.bincount(torch.tensor(case.output, dtype=torch.long), minlength=V).double()
    x = (x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts).to(case.dtype).double()
    x[list(case.banned)] = -math.inf
    if p.greedy:
        return torch.nn.functional.one_hot(x.argmax(), V).double()  # argmax: the first of tied maxima
    z = x / p.temperature
    if p.top_k != -1:
        kth = z.sort(descending=True).values[min(p.top_k, V) - 1]
        z[z < kth] = -math.inf
    probs = torch.softmax(z, dim=0)
    if p.top_p < 1.0:
        order = torch.sort(z, descending=True, stable=True).indices  # tied tokens in id order
        before = probs[order].cumsum(0) - probs[order]
        drop = before >= p.top_p
        drop[0] = False
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's chi-square of counts [V] against probs [V]: (statistic, degrees of freedom, p-value). Tokens
    expected fewer than 5 times are pooled into one cell (joined to the smallest other if still under 5)."""
    n = int(counts.sum())
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big].double().tolist(), expected[big].tolist()
    rest_o, rest_e = float(counts[~big].sum()), float(expected[~big].sum())
    if rest_e >= 5 or (rest_e > 0 and not obs):
        obs.append(rest_o)
        exp.append(rest_e)
    elif rest_e > 0:
        i = min(range(len(exp)), key=exp.__getitem__)
        obs[i] += rest_o
        exp[i] += rest_e
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    df = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64))) if df else 1.0
    return stat, df, p_value


def _check(name: str, tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float, float]:
    """Assert that tokens [n] were drawn from probs [V]: no token of probability 0, every token expected SURE
    times or more, and a chi-square p-value of P_VALUE or more. Returns (chi-square, df, p-value, total
    variation distance) for the record."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=V)
    outside = sorted(set((counts > 0).nonzero().flatten().tolist()) - set((probs > 0).nonzero().flatten().tolist()))
    assert not outside, f"{name}: drew tokens {outside} of probability 0 (kept: {(probs > 0).nonzero().flatten().tolist()})"
    missing = ((probs * n >= SURE) & (counts == 0)).nonzero().flatten().tolist()
    assert not missing, f"{name}: never drew tokens {missing}, expected {[round(float(probs[t] * n)) for t in missing]} times"
    stat, df, p_value = _chi_square(counts, probs)
    tv = 0.5 * float((counts.double() / n - probs).abs().sum())
    assert p_value >= P_VALUE, (f"{name}: chi-square {stat:.1f} on {df} df (p = {p_value:.2e}, total variation "
                                f"{tv:.4f}) over {n} draws: counts {counts.tolist()}, expected "
                                f"{[round(float(e), 1) for e in probs * n]}")
    return stat, df, p_value, tv


def _ranked(logits: list[float], temperature: float = 1.0) -> list[float]:
    """The cumulative probabilities of logits (at a temperature), in order: where top_p cuts lie."""
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=0)
    return p.cumsum(0).tolist()


def _randn(n: int, scale: float, seed: int) -> list[float]:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).tolist()


DISTINCT = [2.0, 1.5, 1.1, 0.6, 0.0, -0.4, -1.2]  # no ties: top_p and min_p cuts fall between tokens
MIXED = [1.0, 0.5, -1.0, 0.2, 0.0, -0.3, 0.8, -2.0]

CASES = [
    Case("softmax at temperature 1", _randn(V, 2.0, 1), SamplingParams(temperature=1.0)),
    Case("very peaked", [9.0, 0.0, -1.0, -2.0, 1.0], SamplingParams(temperature=1.0)),
    Case("very flat, temperature 10", _randn(V, 3.0, 2), SamplingParams(temperature=10.0)),
    Case("temperature 1e-3", [-1e-3 * i for i in range(12)], SamplingParams(temperature=1e-3)),
    Case("large negative logits", [-3e4, -3e4 - 0.5, -1e30, -3e4 - 1.0, -3e4 - 2.5], SamplingParams(temperature=0.7),
         fill=-1e37),
    Case("top_k keeps every token tied with the k-th", [3.0, 2.0, 2.0, 2.0, 0.0, -1.0], SamplingParams(top_k=2)),
    # 32 equal logits: top_p 0.5 keeps exactly 16 (the mass before the 17th is 0.5, exact in float32), the first 16.
    Case("top_p cut among tied tokens", [0.0] * V, SamplingParams(top_p=0.5)),
    # Two tied maxima of 0.41 each: top_p 0.3 keeps one, the one greedy takes (the first).
    Case("top_p keeps the first of tied maxima", [5.0, 5.0] + [0.0] * (V - 2), SamplingParams(top_p=0.3)),
    Case("top_p just under a cut", DISTINCT, SamplingParams(top_p=_ranked(DISTINCT)[2] - 1e-3)),  # keeps 3
    Case("top_p just over a cut", DISTINCT, SamplingParams(top_p=_ranked(DISTINCT)[2] + 1e-3)),  # keeps 4
    Case("min_p just under a token's ratio", DISTINCT, SamplingParams(min_p=math.exp(-0.9) - 1e-3)),  # keeps 3
    Case("min_p just over a token's ratio", DISTINCT, SamplingParams(min_p=math.exp(-0.9) + 1e-3)),  # keeps 2
    # Ratios to the largest at temperature 2: 0.61, 0.37, 0.29, 0.22; at 1 (min-p before temperature): 0.37, 0.14.
    Case("min_p after temperature", [2.0, 1.0, 0.0, -0.5, -1.0], SamplingParams(temperature=2.0, min_p=0.3)),
    Case("temperature, top_k, top_p, min_p together", _randn(20, 1.5, 3),
         SamplingParams(temperature=0.7, top_k=8, top_p=0.8, min_p=0.05)),
    # float16: 60 tokens at e^-8.5 = 2e-4 each hold 1.2% of the mass, each under half a float16 step of a
    # cumulative sum near 1 (what a float16 cdf would lose).
    Case("float16 small probabilities", [0.0] + [-8.5] * (V - 1), SamplingParams(), torch.float16, draws=48_000),
    Case("bfloat16 ties under top_p", _randn(V, 2.0, 4), SamplingParams(temperature=0.9, top_p=0.9), torch.bfloat16),
    # Token 2: -1 + 3 = 2 (bias first), then 2 / 1.5 as a prompt token; in the other order -1 * 1.5 + 3 = 1.5.
    # Token 1: 0.5 / 1.5 - 0.4 - 2 * 0.3 before the temperature halves it.
    Case("logit_bias, then penalties, then temperature", MIXED,
         SamplingParams(temperature=0.5, logit_bias={2: 3.0}, repetition_penalty=1.5, presence_penalty=0.4,
                        frequency_penalty=0.3), prompt=(2, 3), output=(1, 1, 4)),
    # The ban comes before top_k: top_k 2 keeps tokens 1 and 2, not token 1 alone.
    Case("min_tokens ban before top_k", [4.0, 3.0, 2.0, 1.0, 0.0], SamplingParams(top_k=2), banned=(0,)),
]


def _sampling_rows(cases: list[Case], sampler: Sampler) -> list[SamplingRow]:
    """One SamplingRow per case, as the engine makes them: a penalty slot built from the case's tokens, the bias on
    the device."""
    made = []
    for c in cases:
        slot = -1
        if c.params.penalized:
            seq = Sequence(c.name, list(c.prompt), c.params, 64)
            seq.token_ids += list(c.output)
            seq.status = Status.RUNNING
            slot = sampler.penalties.slot(seq)
        bias = sampler.bias_tensors(c.params) if c.params.logit_bias else None
        made.append(SamplingRow(c.params, None, c.banned, penalty_slot=slot, bias=bias))
    return made


def _draw(cases: list[Case], sampler: Sampler) -> dict[str, torch.Tensor]:
    """Each case's tokens, drawn as rows of one step beside the other cases' rows."""
    which = torch.cat([torch.full((c.draws,), i) for i, c in enumerate(cases)])
    which = which[torch.randperm(len(which), generator=torch.Generator().manual_seed(0))]  # interleaved
    rows = _sampling_rows(cases, sampler)
    logits = torch.stack([c.row() for c in cases])[which]  # one dtype
    tokens, finite = sampler(logits, [rows[i] for i in which.tolist()])
    assert all(finite)
    tokens = torch.tensor(tokens)
    return {c.name: tokens[which == i] for i, c in enumerate(cases)}


def _penalised_sampler(cases: list[Case], triton_sampling: bool) -> Sampler:
    return Sampler(torch.device("cpu"), seed=0, triton_sampling=triton_sampling,
                   penalties=Penalties(len(cases), V, torch.device("cpu")))


def test_every_case_is_drawn_from_its_exact_distribution_on_the_torch_path():
    """Each case's 16,000 draws (48,000 for float16), as rows of one step with every other case's rows: no token
    outside the kept set, every likely token drawn, chi-square p >= 1e-6. One step per dtype (the sampler takes
    one logits tensor)."""
    failures = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases = [c for c in CASES if c.dtype == dtype]
        drawn = _draw(cases, _penalised_sampler(cases, triton_sampling=False))
        for c in cases:
            try:
                _check(c.name, drawn[c.name], _exact(c))
            except AssertionError as exc:  # every case's verdict, not only the first
                failures.append(str(exc).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_a_top_p_cut_among_tied_tokens_keeps_the_lowest_ids_as_greedy_does():
    """Two tied maxima of 0.41 each and top_p 0.3: one token stays, and it must be greedy's, the first. The sort
    under top-p put tied tokens in no set order (on the CPU from 17 entries on, the last first): it kept token 1,
    and of 32 equal logits at top_p 0.5 it kept ids 16-31."""
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=False)
    for vocab in (32, 1000):
        logits = torch.zeros(64, vocab)
        logits[:, :2] = 5.0
        tokens, _ = sampler(logits, [SamplingRow(SamplingParams(top_p=1e-3), None)] * 64)
        assert set(tokens) == {0}, (vocab, sorted(set(tokens)))
        tokens, _ = sampler(torch.zeros(4096, vocab), [SamplingRow(SamplingParams(top_p=0.5), None)] * 4096)
        assert set(tokens) <= set(range(vocab // 2)), (vocab, sorted(set(tokens) - set(range(vocab // 2)))[:8])


def test_the_cases_tell_the_orders_apart():
    """Each order case is one where another order keeps other tokens or other probabilities, so that drawing it
    right shows the order: min-p before temperature, the ban after top-k, the penalty before the bias, top-p with
    the other comparison at a cut, tied tokens in another order than their ids."""
    by_name = {c.name: c for c in CASES}

    def support(case: Case, **change) -> set[int]:
        params = SamplingParams(**{f: getattr(case.params, f) for f in ("temperature", "top_k", "top_p", "min_p")}
                                | change)
        probs = _exact(Case(case.name, case.logits, params, case.dtype, case.banned))
        return set((probs > 0).nonzero().flatten().tolist())

    c = by_name["min_p after temperature"]
    assert support(c) == {0, 1, 2} and support(c, temperature=1.0) == {0, 1}  # temperature 1: min-p first
    assert support(by_name["min_tokens ban before top_k"]) == {1, 2}  # banned after top_k, token 1 alone
    assert support(by_name["top_p just under a cut"]) == {0, 1, 2}
    assert support(by_name["top_p just over a cut"]) == {0, 1, 2, 3}
    assert support(by_name["min_p just under a token's ratio"]) == {0, 1, 2}
    assert support(by_name["min_p just over a token's ratio"]) == {0, 1}
    assert support(by_name["top_p cut among tied tokens"]) == set(range(V // 2))
    assert support(by_name["top_p keeps the first of tied maxima"]) == {0}
    c = by_name["logit_bias, then penalties, then temperature"]
    # The repetition penalty first: token 2 is -1 * 1.5 + 3 = 1.5, not 2 / 1.5.
    penalty_first = Case(c.name, [*c.logits[:2], 1.5, *c.logits[3:]],
                         SamplingParams(**{f: getattr(c.params, f) for f in _PENALTIES}, temperature=0.5),
                         prompt=(3,), output=c.output)
    assert float(_exact(penalty_first)[2] - _exact(c)[2]) > 0.05  # 0.58 against 0.49: 20 sigma at 16,000 draws


_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")


def test_the_reference_is_transformers_generate_where_it_is_defined():
    """_exact against transformers' processors in generate()'s order (SequenceBias, RepetitionPenalty, the
    min-new-tokens ban as -inf, Temperature, TopK, TopP, MinP) in float64, for every case transformers defines:
    no presence or frequency penalty, and no tie at a top-p cut (transformers keeps whichever tied tokens its
    unstable sort puts first; the engine keeps the lowest ids, as greedy takes the first maximum)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    compared = 0
    for c in CASES:
        p = c.params
        if p.presence_penalty or p.frequency_penalty or "tied" in c.name or "ties" in c.name:
            continue
        ids = torch.tensor([list(c.prompt + c.output)])
        x = c.row().double()[None]
        if p.logit_bias:
            x = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})(ids, x)
        if p.repetition_penalty != 1.0:
            x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
        x[0, list(c.banned)] = -math.inf
        x = TemperatureLogitsWarper(p.temperature)(ids, x)
        if p.top_k != -1:
            x = TopKLogitsWarper(p.top_k)(ids, x)
        if p.top_p < 1.0:
            x = TopPLogitsWarper(p.top_p)(ids, x)
        if p.min_p > 0.0:
            x = MinPLogitsWarper(p.min_p)(ids, x)
        theirs = torch.softmax(x, dim=-1)[0]
        assert torch.allclose(_exact(c), theirs, rtol=1e-12, atol=1e-300), c.name
        compared += 1
    assert compared >= 12


def test_seeded_rows_draw_the_same_tokens_wherever_they_sit_and_whatever_shares_the_step():
    """16 seeded rows (filtered ones among them), alone and then at other positions among greedy, filtered, biased,
    penalised, banned and unseeded rows: each takes the same token every time (its draw comes from its generator
    alone)."""
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(7)) * 2
    params = [SamplingParams(temperature=0.6 + 0.1 * (i % 5), top_k=[-1, 10][i % 2], top_p=[1.0, 0.9][i % 3 == 0],
                             min_p=[0.0, 0.02][i % 4 == 0], seed=i) for i in range(16)]
    others = [c for c in CASES if c.dtype == torch.float32] + [
        Case("greedy", _randn(V, 1.0, 8), SamplingParams(temperature=0.0))]

    def tokens(beside: list[Case], shuffle: int | None) -> list[int]:
        """The seeded rows' tokens, placed in a step with one row of each case of beside (at random positions
        when shuffle is a seed)."""
        sampler = _penalised_sampler(beside, triton_sampling=False)
        seeded = [(logits[i], SamplingRow(params[i], torch.Generator().manual_seed(1000 + i))) for i in range(16)]
        step = seeded + [(c.row(), r) for c, r in zip(beside, _sampling_rows(beside, sampler), strict=True)]
        order = list(range(len(step)))
        if shuffle is not None:
            order = torch.randperm(len(step), generator=torch.Generator().manual_seed(shuffle)).tolist()
        got, finite = sampler(torch.stack([step[j][0] for j in order]), [step[j][1] for j in order])
        assert all(finite)
        return [got[order.index(i)] for i in range(16)]

    alone = tokens([], None)
    assert tokens(others, 1) == alone
    assert tokens(others[::-1], 2) == alone


@pytest.mark.parametrize("triton_sampling", [False, True], ids=["torch path", "kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_rows_take_the_first_maximum_as_transformers_does(dtype, triton_sampling):
    """Temperature 0 is argmax over the logits after bias, penalties and bans, the first of tied maxima
    (transformers' torch.argmax), alone and beside sampled rows."""
    if triton_sampling:
        require_triton_interpreter()
    logits = torch.full((4, V), -5.0)
    logits[:, 4:8] = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, -2.0, -1.0, -1.0],
                                   [2.0, 1.0, 0.5, 2.0]])
    logits = logits.to(dtype)
    want = [5, 4, 4, 4]
    sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=triton_sampling)
    greedy = SamplingRow(SamplingParams(temperature=0.0), None)
    sampled = SamplingRow(SamplingParams(temperature=1.0), None)
    assert sampler(logits.clone(), [greedy] * 4)[0] == want
    assert sampler(torch.cat([logits, logits]), [greedy] * 4 + [sampled] * 4)[0][:4] == want
    # A bias that ties token 9 with row 0's maximum (3.0 at tokens 5 and 6): still token 5.
    biased = SamplingParams(temperature=0.0, logit_bias={9: 8.0})
    assert sampler(logits[:1].clone(), [SamplingRow(biased, None)])[0] == [5]


# ------------------------------------------------------------------------------------------------------------
# The Triton kernel path (rows without top-k, top-p or min-p), under the interpreter.
KERNEL_CASES = [
    Case("kernel: temperature 0.8", [1.5, 1.0, 0.3, 0.0, -0.5, -1.0], SamplingParams(temperature=0.8), draws=96),
    Case("kernel: bfloat16, temperature 1e-3", [0.0, -1e-3, -2e-3, -4e-3], SamplingParams(temperature=1e-3),
         torch.bfloat16, draws=96),
    Case("kernel: float16, temperature 10", [2.0, -3.0, 1.0, -60000.0, 0.5], SamplingParams(temperature=10.0),
         torch.float16, draws=96),
]
# Drawn beside the others: rows a bias or a ban changed first (the kernel without its finite check) and greedy rows.
KERNEL_BESIDE = [
    Case("kernel: logit_bias", [1.5, 1.0, 0.3, 0.0], SamplingParams(temperature=0.8, logit_bias={3: 1.2}), draws=96),
    Case("kernel: min_tokens ban", [2.0, 1.0, 0.5, 0.0], SamplingParams(temperature=1.5), banned=(0,), draws=96),
    Case("kernel: greedy beside", [0.0, 1.0, 1.0], SamplingParams(temperature=0.0), draws=16),
]


def test_the_triton_kernel_path_draws_each_case_from_its_exact_distribution():
    """The same checks through Sampler with the sampling kernels, a few hundred rows a case (the interpreter):
    they catch a wrong temperature, uniform or row, not a 1% error (the boundary test below bounds those)."""
    require_triton_interpreter()
    for cases in (KERNEL_CASES, KERNEL_BESIDE):
        for dtype in {c.dtype for c in cases}:
            group = [c for c in cases if c.dtype == dtype]
            sampler = _penalised_sampler(group, triton_sampling=True)
            calls = []
            sample_rows = sampler.kernels.sample_rows

            def counting(*args, _calls=calls, _inner=sample_rows, **kwargs):
                _calls.append(kwargs.get("check_finite", False))
                return _inner(*args, **kwargs)

            sampler.kernels = type("Kernels", (), {"sample_rows": staticmethod(counting)})
            drawn = _draw(group, sampler)
            assert calls == [cases is KERNEL_CASES], calls  # one launch: with the finite check on plain rows only
            for c in group:
                _check(c.name, drawn[c.name], _exact(c))


BOUNDARY_CASES = [
    Case("temperature 1", _randn(20, 2.0, 11), SamplingParams()),
    Case("temperature 1e-3", [-1e-3 * i for i in range(10)], SamplingParams(temperature=1e-3)),
    Case("temperature 10", _randn(16, 3.0, 12), SamplingParams(temperature=10.0)),
    Case("large negative logits", [-3e4, -3e4 - 0.5, -1e30, -3e4 - 1.0, -3e4 - 2.5], SamplingParams(temperature=0.7),
         fill=-1e37),
    Case("bfloat16, temperature 1e-3", [-1e-3 * i for i in range(10)], SamplingParams(temperature=1e-3),
         torch.bfloat16),
    Case("bfloat16, large negative logits", [-3e4, -3e4 - 200.0, -1e30, -3e4 - 500.0],
         SamplingParams(temperature=300.0), torch.bfloat16, fill=-1e37),
    Case("float16, temperature 10", _randn(24, 3.0, 13), SamplingParams(temperature=10.0), torch.float16),
    Case("float16, temperature 0.3", _randn(12, 1.0, 14), SamplingParams(temperature=0.3), torch.float16),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on -inf products
def test_the_sampling_kernel_inverts_the_exact_cdf_at_every_tokens_ends():
    """For each token of probability 1e-4 or more, uniforms 1e-5 inside both ends of its float64 cdf interval
    must draw it, and u = 0 and the largest float32 below 1 the first and last tokens of positive probability:
    every such token's probability is within 2e-5 of the exact one, from float32, bfloat16 and float16 logits,
    in chunks of 16 (so that the cdf crosses from one to the next)."""
    require_triton_interpreter()
    from engine_service import sampling_kernels as sk

    delta = 1e-5
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits, inv_temperature, u, want, names = [], [], [], [], []
        for c in [c for c in BOUNDARY_CASES if c.dtype == dtype]:
            probs = _exact(c)
            cdf = probs.cumsum(0)
            positive = (probs > 0).nonzero().flatten().tolist()
            points = [(0.0, positive[0]), (1.0 - 2.0**-24, positive[-1])]
            points += [(float(cdf[t] - probs[t]) + delta, t) for t in positive if probs[t] >= 1e-4]
            points += [(float(cdf[t]) - delta, t) for t in positive if probs[t] >= 1e-4]
            for at, t in points:
                logits.append(c.row())
                inv_temperature.append(1.0 / c.params.temperature)
                u.append(at)
                want.append(t)
                names.append(c.name)
        got = sk.sample_rows(torch.stack(logits), torch.tensor(inv_temperature), torch.tensor(u), block=16).tolist()
        wrong = [(n, at, w, g) for n, at, w, g in zip(names, u, want, got, strict=True) if w != g]
        assert not wrong, f"{dtype}: (case, uniform, token wanted, token drawn): {wrong}"
        assert len(got) >= 20  # the cases hold that many ends


def test_seeded_rows_draw_the_same_tokens_through_the_kernels_and_beside_rows_that_send_the_step_elsewhere():
    """A seeded request's token must not depend on which path its step took: the kernel with its finite check (all
    rows plain), the kernel after a bias (another row biased), the torch path (another row with top_p)."""
    require_triton_interpreter()
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(9)) * 2
    params = [SamplingParams(temperature=0.5 + 0.2 * i, seed=i) for i in range(6)]
    neighbours = {
        "alone": None,
        "beside a biased row": SamplingParams(temperature=1.0, logit_bias={1: 2.0}),
        "beside a top_p row": SamplingParams(temperature=1.0, top_p=0.8),
        "beside a greedy row": SamplingParams(temperature=0.0),
    }
    seen = {}
    for name, other in neighbours.items():
        sampler = Sampler(torch.device("cpu"), seed=0, triton_sampling=True)
        rows = [SamplingRow(p, torch.Generator().manual_seed(100 + i)) for i, p in enumerate(params)]
        step = torch.cat([torch.zeros(1, V), logits]) if other else logits.clone()
        if other:
            bias = sampler.bias_tensors(other) if other.logit_bias else None
            rows = [SamplingRow(other, None, bias=bias)] + rows
        tokens, _ = sampler(step, rows)
        seen[name] = tokens[1:] if other else tokens
    assert len({tuple(t) for t in seen.values()}) == 1, seen
