import pytest

from beamcap.isolation import call_isolating


class FakeOOM(RuntimeError):
    pass


def test_all_good_is_one_call():
    calls = []
    out = call_isolating(lambda xs: calls.append(list(xs)) or [x * 2 for x in xs], [1, 2, 3])
    assert out == [2, 4, 6] and calls == [[1, 2, 3]]


def test_bad_item_isolated_others_succeed():
    def fn(xs):
        if 3 in xs:
            raise ValueError("bad 3")
        return [x * 10 for x in xs]

    out = call_isolating(fn, [1, 2, 3, 4, 5])
    assert out[:2] == [10, 20] and out[3:] == [40, 50]
    assert isinstance(out[2], ValueError) and "bad 3" in str(out[2])


def test_oom_halves_until_it_fits_and_frees_memory():
    sizes, freed = [], []

    def fn(xs):
        sizes.append(len(xs))
        if len(xs) > 2:
            raise FakeOOM("CUDA out of memory")
        return list(xs)

    out = call_isolating(fn, list(range(8)), is_oom=lambda e: isinstance(e, FakeOOM), on_oom=lambda: freed.append(1))
    assert out == list(range(8))
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    assert len(freed) == 3


def test_single_item_oom_is_reported():
    out = call_isolating(lambda xs: (_ for _ in ()).throw(FakeOOM("oom")), [1], is_oom=lambda e: True)
    assert isinstance(out[0], FakeOOM)


def test_wrong_result_count_is_an_error():
    with pytest.raises(RuntimeError, match="expected 2 results"):
        call_isolating(lambda xs: [1], [1, 2])
