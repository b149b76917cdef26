import random

import pytest

from beamcap import simhash_fingerprint
from beamcap.retention import KeepMode, choose_captions, most_similar, sample_rng


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a photo of a cat", 0x8214700201400C02),
        ("A photo, a women with an umbrella", 0xD049402C282807A1),
        ("cat", 0),
        ("", 0),
        ("   cat   ", 0),
    ],
)
def test_simhash_reference_values(text, expected):
    assert simhash_fingerprint(text) == expected


def test_simhash_splits_on_space_only_and_lowercases():
    assert simhash_fingerprint("A  PHOTO of a cat") == simhash_fingerprint("a photo of a cat")
    assert simhash_fingerprint("a\tphoto of a cat") != simhash_fingerprint("a photo of a cat")


def test_most_similar_picks_closest_and_first_on_ties():
    candidates = ["dog running on grass", "a photo of a cat", "a photo of a cat"]
    assert most_similar("a photo of a cat", candidates) == 1
    assert most_similar("x", ["one", "two"]) == 0  # all fingerprints 0: tie -> first


def test_all_mode_gives_candidate_i_of_every_image():
    cands = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert choose_captions(KeepMode.ALL, cands, ["", ""], random.Random()) == [
        ["a0", "b0"],
        ["a1", "b1"],
        ["a2", "b2"],
    ]


def test_similar_mode_per_image_against_its_chunk():
    cands = [["a dog", "a photo of a cat"], ["a photo of a cat", "a red square on grass"]]
    refs = ["a photo of a cat", "a red square on green grass"]
    assert choose_captions(KeepMode.SIMILAR_ONE_SIMHASH, cands, refs, random.Random()) == [
        ["a photo of a cat", "a red square on grass"]
    ]


def test_random_any_seeded_is_a_function_of_seed_and_sample():
    cands = [[f"c{i}" for i in range(10)]] * 4
    pick = lambda seed, key: choose_captions(KeepMode.RANDOM_ANY, cands, [""] * 4, sample_rng(seed, key))  # noqa: E731
    assert pick(7, "s1") == pick(7, "s1")
    assert len({str(pick(s, "s1")) for s in range(20)}) > 1
    assert len({str(pick(7, f"s{k}")) for k in range(20)}) > 1
