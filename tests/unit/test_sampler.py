"""The sampler on hand-made logits: each knob does what users expect, rows stay independent."""

from __future__ import annotations

import torch

from encore.protocol.messages import SamplingParams
from encore.worker.sampler import Sampler, make_state

V = 12
CPU = torch.device("cpu")


def state(params: SamplingParams, prompt=(1, 2), output=(), eos=(11,), index=0):
    return make_state(params, list(prompt), list(output), list(eos), index, CPU)


def sample(logits: torch.Tensor, states, seed: int = 0):
    return Sampler(seed, CPU)(logits.clone(), states)


def peaked(*winners: int) -> torch.Tensor:
    """One row per winner: that token clearly highest, token 0 second."""
    rows = torch.zeros(len(winners), V)
    for i, w in enumerate(winners):
        rows[i, 0] = 4.0
        rows[i, w] = 5.0
    return rows


def test_greedy_takes_argmax_and_appends_history():
    st = state(SamplingParams(temperature=0.0))
    ids, lps = sample(peaked(7), [st])
    assert ids == [7] and lps is None and st.output_token_ids == [7]


def test_top_k_one_and_tiny_top_p_and_min_p_reduce_to_argmax():
    rows = peaked(3, 3, 3)
    states = [state(SamplingParams(temperature=1.0, top_k=1, seed=1)),
              state(SamplingParams(temperature=1.0, top_p=0.01, seed=2)),
              state(SamplingParams(temperature=1.0, min_p=0.9, seed=3))]
    for _ in range(20):
        ids, _ = sample(rows, states)
        assert ids == [3, 3, 3]


def test_seeded_rows_ignore_their_neighbours():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = torch.zeros(1, V)  # uniform: any token possible
    alone, _ = sample(logits, [state(params)])
    crowd = torch.zeros(4, V)
    others = [state(SamplingParams(temperature=1.0)) for _ in range(3)]
    together, _ = sample(crowd, [others[0], state(params), others[1], others[2]], seed=7)
    assert together[1] == alone[0]


def test_seeded_sequence_repeats_and_children_differ():
    def run(index: int) -> list[int]:
        st = state(SamplingParams(temperature=1.0, seed=5), index=index)
        sampler = Sampler(0, CPU)
        return [sampler(torch.zeros(1, V), [st])[0][0] for _ in range(16)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_repetition_penalty_pushes_away_seen_tokens():
    logits = torch.zeros(1, V)
    logits[0, 2] = 1.0  # token 2 is in the prompt
    logits[0, 5] = 0.9
    st = state(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert sample(logits, [st])[0] == [5]


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(1, V)
    logits[0, 4] = 1.0
    logits[0, 6] = 0.5
    st = state(SamplingParams(temperature=0.0, frequency_penalty=0.3), output=(4, 4))
    assert sample(logits, [st])[0] == [6]  # 1.0 - 2 * 0.3 < 0.5
    st = state(SamplingParams(temperature=0.0, presence_penalty=0.4), output=(4, 4))
    assert sample(logits, [st])[0] == [4]  # 1.0 - 0.4 > 0.5


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = peaked(11)  # eos is the favourite
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    st = state(params)
    logits[0, 9] = 4.5
    assert sample(logits, [st])[0] == [0]
    assert sample(logits, [st])[0] == [0]
    assert sample(logits, [st])[0] == [11]  # two outputs done: eos allowed again


def test_logprobs_report_chosen_token_and_top_alternatives():
    logits = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0] + [-9.0] * (V - 3)]), -1)
    st = state(SamplingParams(temperature=0.0, logprobs=2))
    quiet = state(SamplingParams(temperature=0.0))
    ids, lps = sample(torch.cat([logits, logits]), [st, quiet])
    assert ids == [1, 1]
    assert [t.token_id for t in lps[0].top] == [1, 2] and lps[1].top == []
    assert abs(lps[0].logprob - float(logits[0, 1])) < 1e-5


def test_precomputed_argmax_is_used_only_when_no_row_changes_its_logits():
    """A decode graph's argmax stands in for the greedy pick, unless a penalty or the
    min-tokens mask rewrites logits (then the sampler takes the argmax itself)."""
    stale = torch.tensor([5, 5])  # deliberately not the argmax: shows which was used
    plain = [state(SamplingParams(temperature=0.0)), state(SamplingParams(temperature=0.0))]
    ids, _ = Sampler(0, CPU)(peaked(7, 8), plain, stale.clone())
    assert ids == [5, 5]
    penalized = [state(SamplingParams(temperature=0.0)),
                 state(SamplingParams(temperature=0.0, repetition_penalty=1.5))]
    ids, _ = Sampler(0, CPU)(peaked(7, 8), penalized, stale.clone())
    assert ids == [7, 8]
    masked = [state(SamplingParams(temperature=0.0, min_tokens=2), eos=(7,)),
              state(SamplingParams(temperature=0.0))]
    ids, _ = Sampler(0, CPU)(peaked(7, 8), masked, stale.clone())
    assert ids == [0, 8]


def test_a_tiny_temperature_is_greedy_not_nan():
    """5e-324 rounds to 0 in float32: dividing by it made NaN probabilities and a token 0."""
    for t in (5e-324, 1e-7, 9e-6):
        for seed in (None, 3):
            st = state(SamplingParams(temperature=t, seed=seed, logprobs=2))
            for _ in range(5):
                ids, lps = sample(peaked(7), [st])
                assert ids == [7]
                assert all(torch.isfinite(torch.tensor([lps[0].logprob]
                                                       + [x.logprob for x in lps[0].top])))


def test_extreme_penalties_keep_logprobs_finite():
    """A repetition penalty near 0 divides seen logits to infinity; rows stay finite."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5] + [0.0] * (V - 4)])
    for params in (SamplingParams(temperature=0.0, repetition_penalty=5e-324, logprobs=3),
                   SamplingParams(temperature=0.7, repetition_penalty=5e-324, logprobs=3,
                                  seed=1),
                   SamplingParams(temperature=1e-4, repetition_penalty=1e300, logprobs=3,
                                  presence_penalty=1e30, seed=2)):
        st = state(params, prompt=(0, 1, 2))
        for _ in range(4):
            ids, lps = sample(logits, [st])
            values = [lps[0].logprob] + [x.logprob for x in lps[0].top]
            assert all(torch.isfinite(torch.tensor(values))), (params, values)
            assert 0 <= ids[0] < V
    # the near-zero penalty boosts every seen token with a positive logit to the top
    st = state(SamplingParams(temperature=0.0, repetition_penalty=5e-324), prompt=(0, 1, 2))
    assert sample(logits, [st])[0] == [0]  # 0 and 1 tie at the limit; argmax takes the first
