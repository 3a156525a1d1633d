"""Issue 20, point 8: domain names and strategy labels holding `|` or HTML reach report.md escaped (a name stays
in its column, no tag is rendered) and report.csv quoted by the csv module (read back exactly)."""
import csv
import json

import yaml

from dataflex.report import find_runs, group_runs, pick_baseline, write_report

PIPE, HTML = "a|b", "<img src=x onerror=alert(1)>&"


def make_run(folder, mixer, seed, final):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+mixer={mixer}", f"trainer.seed={seed}"]))
    (folder / "config.yaml").write_text(yaml.safe_dump({"trainer": {"seed": seed, "max_steps": 20}}))
    lines = [{"step": 10 * i, "val_loss": {PIPE: m - 0.5, HTML: m + 0.5}} for i, m in enumerate([5.0, 4.0, final])]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "summary.json").write_text(json.dumps({
        "strategy": {"mixer": mixer, "selector": None, "reweighter": None}, "steps": 20, "tokens": 2000,
        "wall_time_s": 20.0, "val_loss": lines[-1]["val_loss"], "domain_weights": {PIPE: 0.5, HTML: 0.5}}))


def test_pipe_and_html_in_domain_names_are_escaped(tmp_path):
    root = tmp_path / "sweep"
    for seed in range(2):
        make_run(root / "v0" / str(seed), "static", seed, 3.0 + 0.1 * seed)
        make_run(root / "v1" / str(seed), "bandit", seed, 2.8 + 0.1 * seed)
    strategies = group_runs(find_runs(root))
    write_report(root, strategies, pick_baseline(strategies), tmp_path / "page")
    md = (tmp_path / "page" / "report.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;&amp;" in md
    assert "a\\|b" in md
    table = md.split("## Final validation loss")[1].split("##")[0]
    rows = [x for x in table.splitlines() if x.startswith("|")]
    assert len({len(x.replace("\\|", "").split("|")) for x in rows}) == 1, rows
    assert len(rows[0].replace("\\|", "").split("|")) == 2 + 2 + 2 + 1     # strategy, seeds, 2 domains, mean
    with open(tmp_path / "page" / "report.csv", newline="") as f:
        header = next(csv.reader(f))
    assert f"val_{PIPE}_mean" in header and f"val_{HTML}_mean" in header     # read back exactly
    assert (root / "v0" / "0" / "summary.json").is_file()      # the runs untouched
