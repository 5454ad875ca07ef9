"""runtime.SpillingReader: a second pass replays the first pass's batches from a temporary
file, bit for bit, and falls back to the source whenever the copy is not whole."""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest

from pyquant.config import FastFinetuneOptions, get_preset
from pyquant.errors import DataError
from pyquant.pipeline import quantize_model
from pyquant.runtime import SpillingReader


class CountingReader:
    def __init__(self, batches):
        self.batches, self.position, self.rewinds, self.reads = batches, 0, 0, 0

    def __len__(self):
        return len(self.batches)

    def get_next(self):
        if self.position == len(self.batches):
            return None
        self.position += 1
        self.reads += 1
        return self.batches[self.position - 1]

    def rewind(self):
        self.rewinds += 1
        self.position = 0


def mixed_batches():
    rng = np.random.default_rng(0)
    return [
        {"image": rng.standard_normal((2, 3, 5, 4)).astype(np.float32),
         "ids": rng.integers(-2 ** 40, 2 ** 40, size=(2, 7)), "mask": rng.random((2, 7)) > 0.5},
        {"image": np.full((1, 3, 5, 4), np.nan, np.float32), "ids": np.zeros((1, 0), np.int64),
         "mask": np.ones((1, 0), bool)},
        {"image": rng.standard_normal((3, 3, 5, 4)).astype(np.float32)[..., ::2],  # non-contiguous
         "ids": np.array(5), "mask": np.array([True])},
    ]


def read_all(reader):
    out = []
    while (feed := reader.get_next()) is not None:
        out.append(feed)
    return out


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for name in w:
            expected = np.asarray(w[name])
            assert g[name].dtype == expected.dtype and g[name].shape == expected.shape
            np.testing.assert_array_equal(g[name], expected)


def test_a_complete_pass_is_replayed_bit_for_bit_without_reading_the_source_again():
    source = CountingReader(mixed_batches())
    reader = SpillingReader(source)
    first = read_all(reader)
    for _ in range(2):  # every later pass replays
        reader.rewind()
        assert reader.replaying
        assert_same_batches(read_all(reader), first)
    assert source.rewinds == 0 and source.reads == 3
    reader.close()


def test_a_pass_that_ended_early_falls_back_to_the_source():
    source = CountingReader(mixed_batches())
    reader = SpillingReader(source)
    reader.get_next()
    reader.rewind()  # before the end: the copy is incomplete
    assert not reader.replaying and source.rewinds == 1
    assert_same_batches(read_all(reader), mixed_batches())
    reader.rewind()  # and the copy is not taken up again
    assert not reader.replaying and source.rewinds == 2


@pytest.mark.parametrize("case", ["over the byte budget", "object arrays"])
def test_batches_that_cannot_be_copied_fall_back_to_the_source(case):
    batches = mixed_batches()
    if case == "object arrays":
        batches[1] = dict(batches[1], extra=np.array(["a", None], dtype=object))
    source = CountingReader(batches)
    reader = SpillingReader(source, max_bytes=100 if case == "over the byte budget" else 1 << 20)
    read_all(reader)
    reader.rewind()
    assert not reader.replaying and source.rewinds == 1
    assert len(read_all(reader)) == 3


def test_a_source_without_rewind_is_refused_only_when_it_must_be_read_again():
    class OnePass:
        def __init__(self):
            self.left = mixed_batches()

        def get_next(self):
            return self.left.pop(0) if self.left else None

    reader = SpillingReader(OnePass())
    reader.get_next()
    with pytest.raises(DataError, match="rewind"):
        reader.rewind()


def test_fast_finetune_reads_the_source_once(tiny_model, tiny_data):
    batches = [{"x": tiny_data[i:i + 8]} for i in range(0, len(tiny_data), 8)]
    source = CountingReader(batches)
    config = dataclasses.replace(get_preset("XINT8"), fast_finetune=FastFinetuneOptions(iterations=5))
    spilled = quantize_model(tiny_model, source, config)
    assert source.rewinds == 0 and source.reads == len(batches)
    assert spilled.reports["fast_finetune"].samples == len(tiny_data)


class FullDisk:
    """A temporary file whose writes fail as on a full disk."""

    name = 3

    def write(self, data):
        raise OSError(28, "No space left on device")

    def truncate(self, size):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("failure", ["no temporary file", "disk full"])
def test_a_copy_that_cannot_be_written_falls_back_to_the_source(failure, monkeypatch):
    def broken(*args, **kwargs):
        if failure == "no temporary file":
            raise OSError(13, "Permission denied")
        return FullDisk()

    monkeypatch.setattr(tempfile, "TemporaryFile", broken)
    source = CountingReader(mixed_batches())
    reader = SpillingReader(source)
    assert_same_batches(read_all(reader), mixed_batches())
    reader.rewind()
    assert not reader.replaying and source.rewinds == 1
    assert_same_batches(read_all(reader), mixed_batches())
    reader.close()
