import collections

import torch

from beamcap.sampling import SeededSampler, uniform_noise
from beamcap.seeding import derive_seed


def test_noise_is_uniform_and_a_function_of_seed_step_and_token():
    u = uniform_noise(torch.tensor([1, 2, 3]), 0, 50_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(uniform_noise(torch.tensor([2]), 0, 10)[0], u[1, :10])
    assert not torch.equal(uniform_noise(torch.tensor([2]), 1, 10)[0], u[1, :10])


def test_sampler_follows_the_distribution():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = collections.Counter(
        int(SeededSampler([s])(torch.zeros(1, 1, dtype=torch.long), scores).argmax()) for s in range(6000)
    )
    assert abs(counts[0] / 6000 - 0.5) < 0.03 and abs(counts[2] / 6000 - 0.2) < 0.03


def test_rows_do_not_depend_on_their_neighbours():
    scores = torch.randn(4, 100)
    together = SeededSampler([11, 12, 13, 14])(torch.zeros(4, 3, dtype=torch.long), scores).argmax(-1)
    alone = [
        SeededSampler([s])(torch.zeros(1, 3, dtype=torch.long), scores[i : i + 1]).argmax(-1).item()
        for i, s in enumerate([11, 12, 13, 14])
    ]
    assert together.tolist() == alone


def test_output_leaves_one_token():
    out = SeededSampler([5, 6])(torch.zeros(2, 1, dtype=torch.long), torch.randn(2, 30))
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == 58


def test_derive_seed_is_stable():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2) != derive_seed(1, "a", 3)
    assert 0 <= derive_seed(123, "x") < 2**63
