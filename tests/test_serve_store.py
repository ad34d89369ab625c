"""The bounded result store of the videos routes (:mod:`ursa_engine.serve.store`): count, bytes and age
bounds (oldest out first), owner namespaces, tombstones, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ursa_engine.serve.security import Limits
from ursa_engine.serve.store import Gone, ResultStore, TooLarge, payload_bytes


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def finished(store, owner, key, nbytes=10):
    store.add(owner, key, {"k": key})
    return store.finish(owner, key, {"file": b"x" * nbytes})


def test_payload_bytes_counts_every_kind():
    t = torch.zeros(3, 4, dtype=torch.int64)
    assert payload_bytes({"a": b"12345", "t": t, "n": np.zeros(7, np.uint8), "none": None}) == 5 + 96 + 7
    with pytest.raises(ValueError, match="payload"):
        payload_bytes({"bad": "a string"})


def test_count_bound_drops_oldest_finished_first():
    s = ResultStore(2, 1 << 20, 60, clock=Clock())
    s.add("k0", "pending")  # pending entries are neither counted nor dropped
    for key in ("a", "b", "c"):
        finished(s, "k0", key)
    assert [e.key for e in s.entries("k0")] == ["pending", "b", "c"]
    with pytest.raises(Gone, match="dropped.*max_stored_results"):
        s.get("k0", "a")
    assert s.stats() == {"entries": 3, "terminal": 2, "bytes": 20}


def test_byte_bound_and_too_large():
    s = ResultStore(100, 25, 60, clock=Clock())
    finished(s, "k0", "a", 10)
    finished(s, "k0", "b", 10)
    finished(s, "k1", "c", 10)  # 30 > 25: "a" (the first to finish) goes, whoever owned it
    with pytest.raises(Gone):
        s.get("k0", "a")
    assert s.get("k0", "b").nbytes == 10 and s.stats()["bytes"] == 20
    s.add("k0", "huge")
    with pytest.raises(TooLarge, match="max_stored_bytes"):
        s.finish("k0", "huge", {"file": b"x" * 26})
    assert not s.get("k0", "huge").terminal  # the caller fails it
    assert s.fail("k0", "huge").payload is None


def test_age_bound_expires_with_a_clear_message():
    clock = Clock()
    s = ResultStore(10, 1000, 30, clock=clock)
    e = finished(s, "k0", "a")
    assert e.expires == clock.t + 30
    clock.t += 29.9
    assert s.get("k0", "a").payload == {"file": b"x" * 10}
    clock.t += 0.2
    with pytest.raises(Gone, match="expired.*result_ttl_s"):
        s.get("k0", "a")
    assert s.entries("k0") == [] and s.stats()["bytes"] == 0
    s.add("k0", "p")
    clock.t += 1e6  # a pending entry never expires
    assert s.get("k0", "p").payload is None


def test_owner_namespaces_and_delete():
    s = ResultStore(10, 1000, 30, clock=Clock())
    finished(s, "k0", "a")
    with pytest.raises(KeyError):  # another key: unknown, as a job of another key is
        s.get("k1", "a")
    assert s.entries("k1") == [] and s.pop("k1", "a") is None
    assert s.pop("k0", "a").key == "a"
    with pytest.raises(KeyError):  # deleted: not "gone" (the owner asked for it)
        s.get("k0", "a")
    assert s.stats() == {"entries": 0, "terminal": 0, "bytes": 0}
    assert s.finish("k0", "a", {"f": b"1"}) is None  # a job whose entry was deleted while it ran
    s.add("k0", "b")
    with pytest.raises(ValueError, match="key"):
        s.add("k0", "b")


def test_from_limits_and_bad_bounds():
    s = ResultStore.from_limits(Limits(max_stored_results=3, max_stored_bytes=99, result_ttl_s=5))
    assert (s.max_results, s.max_bytes, s.ttl_s) == (3, 99, 5.0)
    for kw, name in (({"max_results": 0}, "max_results"), ({"max_bytes": True}, "max_bytes"), ({"ttl_s": 0}, "ttl_s")):
        args = {"max_results": 1, "max_bytes": 1, "ttl_s": 1, **kw}
        with pytest.raises(ValueError, match=name):
            ResultStore(**args)


def test_threads_keep_the_bounds():
    s = ResultStore(16, 16 * 100, 60)
    errors = []

    def work(t):
        try:
            for i in range(200):
                finished(s, f"k{t % 2}", f"{t}-{i}", 100)
                s.entries(f"k{t % 2}")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    st = s.stats()
    assert st["terminal"] == 16 and st["bytes"] == 1600 and st["entries"] == 16
