"""The command line: verbs, exit codes, plan/profile round trip."""

from __future__ import annotations

import json

from conftest import ROOT, run_cli


def test_help_lists_the_verbs():
    done = run_cli("--help")
    assert done.returncode == 0
    for verb in ("check", "plan", "train", "profile", "report", "export", "bench"):
        assert verb in done.stdout


def test_profile_then_plan_with_it(tmp_path, write_spec):
    spec = write_spec({"train": {"seq_len": 128}})
    out = tmp_path / "profile.json"
    done = run_cli("profile", spec, "--seq-lens", "64,128", "--out", out)
    assert done.returncode == 0, done.stderr
    profile = json.loads(out.read_text())
    assert [m["seq_len"] for m in profile["measurements"]] == [64, 128]
    assert "saved bytes per token" in done.stdout
    plan = run_cli("plan", spec, "--profile", out, "--out", tmp_path / "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["feasible"] is True
    assert (tmp_path / "plan" / "plan.json").is_file()
    missing = run_cli("plan", spec, "--profile", tmp_path / "nope.json")
    assert missing.returncode == 2 and "--profile:" in missing.stderr
    bad = run_cli("profile", spec, "--seq-lens", "a,b")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --seq-lens:")


def test_impossible_job_exits_3_with_numbers(tmp_path):
    done = run_cli("plan", ROOT / "examples" / "impossible-70b-1xrtx4090.yaml",
                   "--out", tmp_path)
    assert done.returncode == 3, done.stderr
    text = done.stdout + done.stderr
    assert "GiB" in text and "model states" in text
