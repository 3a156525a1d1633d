"""bench/protocol.py: the committed comparison protocol's plan (which runs, in which order, after which) and how
an interrupted protocol picks up its runs."""
import importlib.util
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_protocol():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_protocol", ROOT / "bench" / "protocol.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


PROTO = yaml.safe_load((ROOT / "bench" / "protocol.yaml").read_text())


def test_every_strategy_of_every_family_runs_every_seed_with_the_same_settings(tmp_path):
    protocol = load_protocol()
    tasks = protocol.tasks(PROTO, tmp_path, [0, 1])
    keys = [t.key for t in tasks]
    assert keys[0] == "reference"
    left_out = PROTO.get("exclude") or {}
    expected = {(f, i, s) for f in PROTO["families"] for i, name in enumerate(protocol.FAMILIES[f])
                if name not in left_out.get(f, ()) for s in (0, 1)}
    assert set(keys[1:]) == expected and len(keys) == len(expected) + 1
    # in a family, seed-major: every strategy's seed 0 starts before any seed 1 (an interrupted protocol stays
    # paired); family by family, in the protocol's order
    for family in PROTO["families"]:
        last_seed0 = max(i for i, k in enumerate(keys) if k != "reference" and k[0] == family and k[2] == 0)
        first_seed1 = min(i for i, k in enumerate(keys) if k != "reference" and k[0] == family and k[2] == 1)
        assert last_seed0 < first_seed1
    assert [k[0] for k in keys[1:]] == sorted((k[0] for k in keys[1:]), key=PROTO["families"].index)
    fixed = {f"trainer.max_steps={PROTO['steps']}", f"trainer.eval_every={PROTO['eval_every']}",
             f"data={PROTO['corpus']}", f"model={PROTO['model']}", f"backend={PROTO['backend']}"}
    for t in tasks:
        assert fixed <= set(t.args), t.key
        seed = 0 if t.key == "reference" else t.key[2]
        assert t.args[-1] == f"trainer.seed={seed}"
        # a path to the same seed's run is written `${trainer.seed}` (Hydra resolves it): every seed of a
        # strategy has the same overrides, so the results page groups them as one strategy
        assert all("${trainer.seed}" in a for a in t.args if "/v" in a and "=" in a and "hydra" not in a), t.args


def test_runs_wait_for_the_runs_they_read_and_twins_are_copied(tmp_path):
    protocol = load_protocol()
    tasks = {t.key: t for t in protocol.tasks(PROTO, tmp_path, [0, 1])}
    names = {f: list(protocol.FAMILIES[f]) for f in PROTO["families"]}
    doremi = names["mixers"].index("doremi (proxy, apply=loss)")
    on_doremi = names["mixers"].index("static on doremi's mixture")
    assert ("mixers", doremi, 1) in tasks[("mixers", on_doremi, 1)].deps        # its own seed's mixture
    less = names["selectors"].index("less (10% of the pool)")
    matched = names["selectors"].index("random length-matched to less")
    assert tasks[("selectors", matched, 0)].deps == [("selectors", less, 0)]
    sheared = names["mixers"].index("sheared (clipped)")
    assert "reference" in tasks[("mixers", sheared, 1)].deps
    # the run without plugins is a strategy of all three families: made once per seed, copied twice
    plain = [t for t in tasks.values() if t.key != "reference" and t.key[2] == 1
             and not any(a.startswith("+") for a in t.args)]
    assert len(plain) == 3 and sum(t.copy_of is None for t in plain) == 1
    assert all(t.copy_of.args == t.args for t in plain if t.copy_of is not None)


def test_an_interrupted_run_continues_from_its_checkpoint_or_starts_over_in_its_folder(tmp_path):
    protocol = load_protocol()
    task = protocol.tasks(PROTO, tmp_path, [0])[1]
    assert not any(a.startswith("trainer.resume") or a.startswith("trainer.overwrite") for a in protocol.command(task))
    task.folder.mkdir(parents=True)
    (task.folder / "metrics.jsonl").write_text("")
    assert "trainer.overwrite=true" in protocol.command(task)
    (task.folder / "checkpoints" / "step_100").mkdir(parents=True)
    assert "trainer.resume=latest" in protocol.command(task)
    assert protocol.command(task)[-1] == f"hydra.run.dir={task.folder}"
    (task.folder / "summary.json").write_text('{"interrupted": {"step": 100}}')      # stopped by a signal
    assert not task.done() and "trainer.resume=latest" in protocol.command(task)
    (task.folder / "summary.json").write_text('{"interrupted": null}')
    assert task.done()


def test_a_run_locked_by_a_live_process_is_busy(tmp_path):
    import fcntl

    protocol = load_protocol()
    task = protocol.tasks(PROTO, tmp_path, [0])[1]
    task.folder.mkdir(parents=True)
    lock = task.folder / ".dataflex.lock"
    lock.write_text('{"pid": 1}')
    assert not task.busy()                      # a lock file nobody holds: a finished or killed run's
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert task.busy()
    assert not task.busy()
