"""Label mappings from ImageNet logits to a target task: first-K and ILM-VP's greedy frequency mapping."""

import pytest
import torch

from vpfast.backbones import FirstK, FrequencyMapping, greedy_one_to_one

pytestmark = pytest.mark.cpu


def test_first_k_takes_the_first_logits():
    logits = torch.randn(3, 1000)
    assert torch.equal(FirstK(10)(logits), logits[:, :10])
    with pytest.raises(ValueError, match="at least 10 source logits, got 5"):
        FirstK(10)(torch.randn(3, 5))


def test_greedy_assignment_known_answer():
    counts = torch.tensor([
        [9, 8, 0],  # source 0: target 0 (9) beats target 1 (8), so target 1 must settle for source 1
        [0, 7, 1],
        [0, 0, 2],
        [5, 0, 0],
    ])
    assert greedy_one_to_one(counts).tolist() == [0, 1, 2]
    assert counts.argmax(dim=0).tolist() == [0, 0, 2]  # per-target argmax would map two targets to source 0


def test_greedy_assignment_matches_walking_cells_by_count():
    """Same answer as visiting cells by descending count (row-major on ties), keeping those with free row and column."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (50, 20), generator=generator)  # many ties, some all-zero rows
    expected, used_sources = {}, set()
    for cell in sorted(range(counts.numel()), key=lambda cell: (-int(counts.view(-1)[cell]), cell)):
        source, target = divmod(cell, 20)
        if source not in used_sources and target not in expected:
            expected[target] = source
            used_sources.add(source)
    mapping = greedy_one_to_one(counts)
    assert mapping.tolist() == [expected[target] for target in range(20)]
    assert mapping.unique().numel() == 20
    assert greedy_one_to_one(torch.zeros(5, 5, dtype=torch.long)).tolist() == [0, 1, 2, 3, 4]


def test_greedy_assignment_needs_enough_sources():
    with pytest.raises(ValueError, match="num_target <= num_source, got 5 > 4"):
        greedy_one_to_one(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="num_target must be <= num_source"):
        FrequencyMapping(4, 5)


def test_frequency_mapping_counts_predictions_and_maps_logits():
    mapping = FrequencyMapping(num_source=6, num_target=3)
    predicted = torch.tensor([4, 4, 1, 4, 1, 5, 5])
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    logits = torch.randn(7, 6) + 10 * torch.nn.functional.one_hot(predicted, 6)
    mapping.update(logits[:4], targets[:4])  # accumulates across batches
    mapping.update(logits[4:], targets[4:])
    expected = torch.zeros(6, 3, dtype=torch.long)
    for source, target in zip(predicted.tolist(), targets.tolist(), strict=True):
        expected[source, target] += 1
    assert torch.equal(mapping.counts, expected)
    assert mapping.assign().tolist() == [4, 1, 5]  # (4, 0) = 2 ties (5, 2) = 2 and comes first; then (1, 1)
    assert mapping.counts.sum() == 0  # the next refresh counts with the then-current prompt
    assert torch.equal(mapping(logits), logits[:, [4, 1, 5]])


def test_frequency_mapping_starts_as_first_k_and_checks_shapes():
    mapping = FrequencyMapping(10, 4)
    logits = torch.randn(2, 10)
    assert torch.equal(mapping(logits), logits[:, :4])
    with pytest.raises(ValueError, match=r"source_logits \(B, 10\) and targets \(B,\), got \(2, 9\) and \(2,\)"):
        mapping.update(torch.randn(2, 9), torch.zeros(2, dtype=torch.long))


def test_frequency_mapping_state_dict_round_trip():
    mapping = FrequencyMapping(8, 3, refresh_every=2)
    mapping.update(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    mapping.assign()
    state = mapping.state_dict()
    assert list(state) == ["mapping"]  # the counts are scratch, not checkpoint state
    restored = FrequencyMapping(8, 3, refresh_every=2)
    restored.load_state_dict(state)
    logits = torch.randn(4, 8)
    assert torch.equal(restored(logits), mapping(logits))


@pytest.mark.parametrize(("refresh_every", "refresh_epochs"), [(None, [0]), (1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4])])
def test_should_refresh(refresh_every, refresh_epochs):
    mapping = FrequencyMapping(10, 2, refresh_every=refresh_every)
    assert [epoch for epoch in range(6) if mapping.should_refresh(epoch)] == refresh_epochs
    with pytest.raises(ValueError, match="refresh_every must be None or a positive number of epochs, got 0"):
        FrequencyMapping(10, 2, refresh_every=0)
