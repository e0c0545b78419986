"""The pool's scheduling policy (_pool_core), with made-up times and no processes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from anyfork._pool_core import GONE, READY, RETIRING, Scheduler, Worker


def started(s: Scheduler[str], now: float = 0.0, n: int | None = None) -> list[Worker]:
    """Start (and make ready) what the scheduler asked for; the new workers."""
    count = s.take_starts() if n is None else n
    return [s.added(f"w{len(s.workers)}", now) for _ in range(count)]


def test_the_first_call_starts_the_first_worker_at_once() -> None:
    s: Scheduler[str] = Scheduler(max=4)
    assert s.submit("a", 0.0) is None
    assert s.take_starts() == 1
    assert s.take_starts() == 0  # counted once
    w = s.added("w0", 0.0)
    assert s.ready(w, 0.01) == [(w, "a")]
    assert w.load == 1


def test_calls_go_to_the_least_loaded_worker_up_to_load() -> None:
    s: Scheduler[str] = Scheduler(max=2, load=2)
    a, b = (s.added(k, 0.0) for k in "ab")
    s.ready(a, 0.0)
    s.ready(b, 0.0)
    assert s.submit("1", 0.0) is a
    assert s.submit("2", 0.0) is b
    assert s.submit("3", 0.0) is a
    assert s.submit("4", 0.0) is b
    assert s.submit("5", 0.0) is None  # both at load 2: it queues
    assert list(s.queue) == ["5"]
    assert s.finished(b, 0.1) == [(b, "5")]
    assert (a.load, b.load) == (2, 2)


def test_queued_calls_start_another_worker_after_start_seconds() -> None:
    s: Scheduler[str] = Scheduler(max=3, load=1, start=0.25)
    s.submit("1", 0.0)
    (w,) = started(s)
    s.ready(w, 0.0)
    assert s.submit("2", 1.0) is None
    assert s.next_deadline() == 1.25
    s.due(1.125)
    assert s.take_starts() == 0  # not yet
    s.due(1.25)
    assert s.take_starts() == 1
    s.added("w1", 1.25)  # still starting, the queue still waits
    assert s.next_deadline() == 1.5
    s.due(1.5)
    assert s.take_starts() == 1
    s.added("w2", 1.5)
    s.due(5.0)
    assert s.take_starts() == 0  # max reached, whatever the queue says
    assert s.next_deadline() is None


def test_idle_workers_are_retired_after_stop_seconds_down_to_idle() -> None:
    s: Scheduler[str] = Scheduler(max=3, idle=1, stop=10.0)
    ws = [s.added(k, 0.0) for k in "abc"]
    for w in ws:
        s.ready(w, 0.0)
    assert s.submit("x", 5.0) is ws[0]
    s.finished(ws[0], 8.0)
    assert s.next_deadline() == 10.0
    assert s.due(9.9) == []
    assert s.due(10.0) == [ws[1], ws[2]]  # a was busy until 8.0: its 10 s aren't up
    assert [w.state for w in ws] == [READY, RETIRING, RETIRING]
    assert s.due(100.0) == []  # keep one: ``idle``
    assert s.next_deadline() is None


def test_idle_keeps_workers_started() -> None:
    s: Scheduler[str] = Scheduler(max=4, idle=2)
    s.due(0.0)
    assert s.take_starts() == 2
    s.added("a", 0.0)
    s.added("b", 0.0)
    s.due(1.0)
    assert s.take_starts() == 0
    s.gone(s.workers[0], 2.0)
    s.due(2.0)
    assert s.take_starts() == 1  # replaced


def test_idle_is_capped_by_max() -> None:
    s: Scheduler[str] = Scheduler(max=2, idle=5)
    s.due(0.0)
    assert s.take_starts() == 2


def test_max_tasks_retires_a_worker_and_starts_its_replacement_early() -> None:
    s: Scheduler[str] = Scheduler(max=1, load=1, max_tasks=1)
    s.submit("1", 0.0)
    (w,) = started(s)
    assert s.ready(w, 0.0) == [(w, "1")]
    assert w.state == RETIRING
    assert s.take_starts() == 0  # max=1: the replacement waits for w to go
    assert s.submit("2", 0.0) is None
    s.finished(w, 0.1)
    assert w.state == RETIRING
    assert w.load == 0  # the driver closes it now
    s.gone(w, 0.1)
    assert s.take_starts() == 1
    w2 = s.added("w2", 0.2)
    assert s.ready(w2, 0.2) == [(w2, "2")]


def test_max_tasks_with_room_starts_the_replacement_at_the_last_call() -> None:
    s: Scheduler[str] = Scheduler(max=2, load=1, max_tasks=2)
    s.submit("1", 0.0)
    (w,) = started(s)
    s.ready(w, 0.0)
    s.finished(w, 0.0)
    assert s.submit("2", 0.0) is w  # its second and last
    assert w.state == RETIRING
    assert s.take_starts() == 1


def test_a_dead_worker_with_calls_waiting_is_replaced_at_once() -> None:
    s: Scheduler[str] = Scheduler(max=2, load=1, start=60.0)
    s.submit("1", 0.0)
    (w,) = started(s)
    s.ready(w, 0.0)
    s.submit("2", 0.0)
    s.gone(w, 1.0)
    assert w.state == GONE
    assert s.take_starts() == 1
    assert list(s.queue) == ["2"]


def test_a_queued_call_can_be_cancelled_a_sent_one_cannot() -> None:
    s: Scheduler[str] = Scheduler(max=1, load=1)
    s.submit("1", 0.0)
    (w,) = started(s)
    s.ready(w, 0.0)
    s.submit("2", 0.0)
    assert s.cancel("2")
    assert not s.cancel("1")
    assert s.finished(w, 0.1) == []


def test_retire_stops_new_calls() -> None:
    s: Scheduler[str] = Scheduler(max=2, load=4)
    a = s.added("a", 0.0)
    s.ready(a, 0.0)
    s.retire(a)
    assert s.submit("1", 0.0) is None


_events = st.lists(st.tuples(st.sampled_from(["submit", "finish", "ready", "gone", "due", "start", "take", "add",
                                              "cancel"]),
                             st.integers(0, 10)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(max_=st.integers(1, 4), load=st.integers(1, 3), idle=st.integers(0, 3),
       max_tasks=st.one_of(st.none(), st.integers(1, 3)), events=_events)
def test_no_call_is_lost_or_sent_twice_and_the_limits_hold(
        max_: int, load: int, idle: int, max_tasks: int | None, events: list[tuple[str, int]]) -> None:
    s: Scheduler[int] = Scheduler(max=max_, idle=idle, load=load, start=0.5, stop=2.0, max_tasks=max_tasks)
    now = 0.0
    submitted: list[int] = []
    sent: dict[int, Worker] = {}
    done: set[int] = set()
    cancelled: set[int] = set()
    taken = 0  # handed out by take_starts, not added yet: the driver starts them outside its lock

    def record(pairs: list[tuple[Worker, int]]) -> None:
        for w, call in pairs:
            assert call not in sent, "sent twice"
            assert w.state in (READY, RETIRING)
            sent[call] = w

    for kind, n in events:
        now += 0.3
        if kind == "submit":
            call = len(submitted)
            submitted.append(call)
            w = s.submit(call, now)
            if w is not None:
                record([(w, call)])
        elif kind == "finish":
            busy = [c for c, w in sent.items() if c not in done and w.state != GONE]
            if busy:
                call = busy[n % len(busy)]
                done.add(call)
                w = sent[call]
                record(s.finished(w, now))
                if w.state == RETIRING and not w.load:
                    record(s.gone(w, now))  # as the driver does: it closes the worker at once
        elif kind == "ready":
            starting = [w for w in s.workers if w.state == "starting"]
            if starting:
                record(s.ready(starting[n % len(starting)], now))
        elif kind == "gone" and s.workers:
            w = s.workers[n % len(s.workers)]
            for c, x in sent.items():
                if x is w:
                    done.add(c)
            record(s.gone(w, now))
        elif kind == "due":
            for w in s.due(now):  # idle workers to retire: the driver closes them at once
                record(s.gone(w, now))
        elif kind == "start":
            for _ in range(s.take_starts()):
                s.added(object(), now)
        elif kind == "take":
            taken += s.take_starts()
        elif kind == "add" and taken:
            taken -= 1
            s.added(object(), now)
        elif kind == "cancel" and s.queue:
            call = list(s.queue)[n % len(s.queue)]
            assert s.cancel(call)
            cancelled.add(call)
        assert len(s.workers) + s.to_start + taken <= max_, "more workers than max"
        for w in s.workers:
            assert 0 <= w.load <= load
            assert w.state != GONE
    # Every call is exactly one of: sent, still queued, cancelled.
    queued = set(s.queue)
    for call in submitted:
        assert (call in sent) + (call in queued) + (call in cancelled) == 1
    # Queued calls are never left with nobody to take them or start one.  A
    # retiring worker still answering holds its place under max until it
    # goes, and its going starts one (gone(), checked by the events above).
    if s.queue and not any(w.state in ("starting", READY) or (w.state == RETIRING and w.load)
                           for w in s.workers):
        assert s.to_start + taken >= 1


def test_a_start_handed_out_holds_its_place_until_the_driver_adds_it() -> None:
    # The driver takes its starts under its lock and forks them outside it.
    # A worker reaching max_tasks in between must not ask for another: with
    # max=1, that second start found no room, and the pool called itself
    # broken ("each has max workers").
    s: Scheduler[str] = Scheduler(max=1, load=1, max_tasks=1)
    s.submit("1", 0.0)
    (w,) = started(s)
    s.ready(w, 0.0)  # "1" is its last call: it retires
    s.finished(w, 0.1)
    s.gone(w, 0.1)
    s.submit("2", 0.1)
    assert s.take_starts() == 1  # its replacement: handed out, not added yet
    s.submit("3", 0.2)
    s.due(5.0)
    assert s.take_starts() == 0
    w2 = s.added("w2", 0.3)
    assert s.ready(w2, 0.3) == [(w2, "2")]
    assert s.take_starts() == 0  # max=1: the next waits for w2 to go
