"""BLAS threads: the free-cores rule (blas.free_core_threads) on numbers fed to it, the
FreeCores windows, explicit choices winning over it, and the Trainer re-checking. Nothing
here is timed: the samples are made up, and the library's thread count is a fake."""
import pytest

from tinylora import blas, train
from tinylora.backend import np
from tinylora.models.gpt import GPT, GPTConfig
from tinylora.train import TrainConfig, Trainer

STAT = """cpu  900 0 300 5000 20 0 0 7 0 0
cpu0 100 0 50 1000 5 0 0 1 0 0
cpu1 200 10 50 1000 5 3 2 2 0 0
cpu2 300 0 100 1000 5 0 0 2 0 0
cpu3 300 0 100 2000 5 0 0 2 0 0
intr 12345 0 0
ctxt 999
"""


# ----------------------------------------------------------------------------- the rule

def test_a_quiet_machine_gets_every_core():
    # 4 cores, 1 s: this process used 3.9 CPU-s of the 3.95 busy ones, others 0.05 of a core
    assert blas.free_core_threads(4, busy_s=3.95, own_s=3.9, wall_s=1.0) == 4
    assert blas.free_core_threads(1, busy_s=0.0, own_s=0.0, wall_s=1.0) == 1


def test_one_core_kept_busy_elsewhere_gives_one_thread_fewer():
    assert blas.free_core_threads(4, busy_s=4.0, own_s=3.0, wall_s=1.0) == 3
    # our 4 threads and a spinner share 4 cores: the spinner gets 4/5 of one, still "busy"
    assert blas.free_core_threads(4, busy_s=4.0, own_s=3.2, wall_s=1.0) == 3
    # 2 cores, 2 threads + a spinner: it gets 2/3 of a core
    assert blas.free_core_threads(2, busy_s=2.0, own_s=4 / 3, wall_s=1.0) == 1
    # half a window of a spinner is busy (rounded half up); less than half is not
    assert blas.free_core_threads(4, busy_s=2.5, own_s=0.5, wall_s=4.0) == 3
    assert blas.free_core_threads(4, busy_s=2.4, own_s=0.5, wall_s=4.0) == 4


def test_every_core_busy_elsewhere_still_leaves_one_thread():
    assert blas.free_core_threads(4, busy_s=8.0, own_s=0.1, wall_s=2.0) == 1
    assert blas.free_core_threads(2, busy_s=20.0, own_s=0.0, wall_s=1.0) == 1


def test_own_time_above_the_busy_ticks_and_an_empty_window_count_as_quiet():
    assert blas.free_core_threads(2, busy_s=0.9, own_s=1.0, wall_s=1.0) == 2   # tick rounding
    assert blas.free_core_threads(2, busy_s=1.0, own_s=0.0, wall_s=0.0) == 2


def test_busy_seconds_reads_only_the_cores_this_process_may_use():
    # busy = user + nice + system + irq + softirq; idle, iowait and steal are not
    assert blas.busy_seconds(STAT, {0}) == pytest.approx(1.5)
    assert blas.busy_seconds(STAT, {1}) == pytest.approx(2.65)
    assert blas.busy_seconds(STAT, {0, 1, 2, 3}) == pytest.approx(1.5 + 2.65 + 4 + 4)
    assert blas.busy_seconds(STAT, {2, 3}, ticks_per_s=1000) == pytest.approx(0.8)
    assert blas.busy_seconds(STAT, set()) == 0.0


def test_affinity_smaller_than_the_machine_is_honoured():
    # 4 CPUs, this process may use cpu2 and cpu3; cpu0 and cpu1 are saturated by others,
    # which must not count against us: both of ours are free
    before = STAT
    after = STAT.replace("cpu0 100 0 50 1000", "cpu0 200 0 50 1000") \
                .replace("cpu1 200 10 50 1000", "cpu1 300 10 50 1000")
    mine = {2, 3}
    busy = blas.busy_seconds(after, mine) - blas.busy_seconds(before, mine)
    assert blas.free_core_threads(len(mine), busy, 0.0, 1.0) == 2
    everyone = blas.busy_seconds(after, range(4)) - blas.busy_seconds(before, range(4))
    assert blas.free_core_threads(4, everyone, 0.0, 1.0) == 2
    assert blas.usable_cpus() <= set(range(4096)) and len(blas.usable_cpus()) >= 1


def test_read_sample_reports_this_machine_or_none():
    s = blas.read_sample()
    if s is None:           # no /proc/stat: the rule is off there
        return
    t, busy, own, usable = s
    assert busy >= 0 and own >= 0 and usable == len(blas.usable_cpus())


# ----------------------------------------------------------------------------- windows

class FakeMachine:
    """Samples from a made-up clock: ``others`` cores busy elsewhere, ``own`` used by us."""

    def __init__(self, usable=4, others=0.0, own=1.0, step=0.0):
        self.t, self.busy, self.own_s = 100.0, 0.0, 0.0
        self.usable, self.others, self.own, self.step = usable, others, own, step
        self.calls, self.slept = 0, []

    def advance(self, dt):
        self.t += dt
        self.busy += (self.others + self.own) * dt
        self.own_s += self.own * dt

    def sample(self):
        self.calls += 1
        s = (self.t, self.busy, self.own_s, self.usable)
        self.advance(self.step)      # time passes between samples
        return s

    def sleep(self, dt):
        self.slept.append(dt)
        self.advance(dt)


class FakeLibrary:
    def __init__(self, monkeypatch, threads=4):
        self.threads, self.applied = threads, []
        monkeypatch.setattr(blas, "get_num_threads", lambda: self.threads)
        monkeypatch.setattr(blas, "_apply", self.apply)

    def apply(self, n):
        self.applied.append(n)
        self.threads = n


@pytest.fixture
def unpinned(monkeypatch):
    """No explicit choice in force (the suite itself runs under OPENBLAS_NUM_THREADS=1)."""
    for name in blas._LIBRARY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(blas, "_chosen", None)
    monkeypatch.setattr(blas, "_pinned", 0)


def test_the_first_check_samples_a_short_window_and_later_ones_never_sleep(unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch)
    m = FakeMachine(usable=4, others=1.0, step=0.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep, window=0.2)
    fc.start()
    assert m.slept == [pytest.approx(0.2)] and lib.applied == [3] and fc.threads == 3
    m.others = 0.0
    m.advance(5.0)
    assert fc.check() == 4 and m.slept == [pytest.approx(0.2)]   # the delta since the last
    fc.stop()
    assert lib.threads == 4


def test_a_short_window_keeps_the_answer_and_a_stale_one_is_sampled_again(unpinned, monkeypatch):
    FakeLibrary(monkeypatch)
    m = FakeMachine(usable=4, others=2.0, step=0.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep, window=0.2, max_age=30.0)
    assert fc.answer(max_age=30.0) == 2
    m.others = 0.0
    m.advance(0.05)
    assert fc.answer() == 2 and len(m.slept) == 1        # too short: the answer stands
    m.advance(0.5)
    assert fc.answer() == 4 and len(m.slept) == 1        # the window grew past 0.2 s
    m.others = 3.0
    m.advance(100.0)
    assert fc.answer() == 1 and len(m.slept) == 1        # in training: the long window
    m.others = 0.0
    m.advance(100.0)                                     # at start, stale: a fresh short one
    assert fc.answer(max_age=30.0) == 4 and len(m.slept) == 2


def test_the_rule_restores_the_count_and_never_exceeds_the_one_found_at_start(unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch, threads=2)           # someone capped the library at 2
    m = FakeMachine(usable=8, others=0.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep)
    fc.start()
    assert lib.applied == [] and lib.threads == 2        # 8 free, but at most 2
    m.others = 7.0
    m.advance(1.0)
    assert fc.check() == 1
    fc.stop()
    assert lib.applied == [1, 2]


def test_a_count_changed_behind_the_rules_back_is_left_alone(unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch, threads=4)
    m = FakeMachine(usable=4, others=1.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep)
    fc.start()
    lib.threads = 2                                      # e.g. threadpoolctl called directly
    m.others = 0.0
    m.advance(1.0)
    assert fc.check() is None and lib.threads == 2
    fc.stop()
    assert lib.threads == 2 and lib.applied == [3]


def test_outside_start_and_stop_nothing_changes(unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch)
    m = FakeMachine(usable=4, others=3.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep)
    assert fc.check() is None and lib.applied == [] and m.calls == 0


def test_without_proc_stat_the_library_default_stands(unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch)
    fc = blas.FreeCores(lambda: None, sleep=lambda dt: None)
    fc.start()
    assert fc.check() is None
    fc.stop()
    assert lib.applied == [] and lib.threads == 4


# ----------------------------------------------------------------------------- explicit wins

def test_explicit_choices_are_named(unpinned, monkeypatch):
    assert blas.explicit_choice() is None
    with blas.limit_threads(1):
        assert blas.explicit_choice() == "limit_threads"
    assert blas.explicit_choice() is None
    with blas.limit_threads(None), blas.limit_threads(0):
        assert blas.explicit_choice() is None
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert blas.explicit_choice() == "OPENBLAS_NUM_THREADS"
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.setattr(blas, "_chosen", 2)
    assert blas.explicit_choice() == "set_num_threads(2)"
    with pytest.raises(ValueError, match="at least 1 thread"):
        blas.limit_threads(-1)


@pytest.mark.parametrize("how", ["set_num_threads", "environment", "cli", "limit_threads",
                                 "OMP_NUM_THREADS"])
def test_an_explicit_choice_is_never_overridden_by_the_rule(how, unpinned, monkeypatch):
    before = blas.get_num_threads()
    try:
        if how == "set_num_threads":
            blas.set_num_threads(1)
        elif how == "environment":
            monkeypatch.setenv("TINYLORA_NUM_THREADS", "1")
            blas._from_environment()
        elif how == "cli":
            from tinylora.cli import main
            assert main(["--threads", "1", "adapters", "list", "/nonexistent-h1"]) in (0, 1)
        elif how == "OMP_NUM_THREADS":
            monkeypatch.setenv("OMP_NUM_THREADS", "1")
        pin = blas.limit_threads(1) if how == "limit_threads" else blas.limit_threads(None)
        with pin:
            assert blas.explicit_choice() is not None
            lib = FakeLibrary(monkeypatch, threads=1)
            m = FakeMachine(usable=4, others=0.0)
            fc = blas.FreeCores(m.sample, sleep=m.sleep, interval=0.0)
            monkeypatch.setattr(train, "training_threads", fc)
            _train(steps=3, eval_interval=2)
            assert lib.applied == [] and lib.threads == 1 and m.calls == 0
    finally:
        if before:                   # the real library (set_num_threads changed it)
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=before, user_api="blas")


# ----------------------------------------------------------------------------- the Trainer

def _train(steps, eval_interval=0):
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokens = np.random.default_rng(0).integers(0, 11, 400)
    cfg = TrainConfig(max_iters=steps, batch_size=2, eval_interval=eval_interval, eval_iters=1,
                      warmup_iters=0, progress=False)
    return Trainer(model, (tokens[:300], tokens[300:]), cfg).train()


def test_the_trainer_checks_at_start_every_interval_around_evaluation_and_restores(
        unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch, threads=4)
    m = FakeMachine(usable=4, others=1.0, step=1.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep, interval=0.0)   # every step is due
    monkeypatch.setattr(train, "training_threads", fc)
    checks = []
    real = fc.check
    monkeypatch.setattr(fc, "check", lambda **kw: checks.append(lib.threads) or real(**kw))
    seen = []
    monkeypatch.setattr(fc, "tick", lambda: seen.append(lib.threads) or blas.FreeCores.tick(fc))
    _train(steps=4, eval_interval=2)
    # start (1) + every step (4) + before and after each evaluation (steps 0, 2, 4: 6)
    assert len(checks) == 11 and len(seen) == 4
    assert lib.applied[0] == 3 and seen[0] == 3          # one core busy elsewhere: 3 threads
    assert lib.threads == 4                              # the count found at start is back


def test_the_trainer_follows_the_machine_as_it_changes(unpinned, monkeypatch):
    lib = FakeLibrary(monkeypatch, threads=2)
    m = FakeMachine(usable=2, others=0.0)
    fc = blas.FreeCores(m.sample, sleep=m.sleep, interval=0.0)
    monkeypatch.setattr(train, "training_threads", fc)
    counts = []

    def busier():
        counts.append(lib.threads)
        m.others = 1.0                                   # a spinner starts after step 1
        m.advance(1.0)
    monkeypatch.setattr(fc, "tick", lambda: (busier(), blas.FreeCores.tick(fc)))
    _train(steps=3)
    assert counts == [2, 1, 1] and lib.applied == [1, 2]
