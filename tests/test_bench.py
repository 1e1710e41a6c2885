"""Smoke tests: every bench script runs at a tiny size and prints its ratio lines.

Speed is never asserted here (see DESIGN.md): only that the scripts run, print the
ratios they promise, and refuse bad arguments with one line and exit code 2.
"""

import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common, compile_time, decode_ceiling, generate, gpu, train_ablations, train_speed  # noqa: E402

RATIO = r"ratio .*: \d+\.\d\d"


def ratio_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(RATIO, line)]


def test_train_speed_prints_its_ratios(capsys):
    train_speed.main(train_speed.Args(sizes=("tiny",), batch=2, repeats=1, breakdown=True, matmul_n=128))
    lines = ratio_lines(capsys.readouterr().out)
    for wanted in ("llmfn/torch tokens/s", "llmfn MFU", "scan/unrolled", "llmfn fwd+bwd/fwd", "torch fwd+bwd/fwd"):
        assert any(wanted in line for line in lines), (wanted, lines)


def test_train_ablations_prints_a_ratio_per_variant(capsys):
    train_ablations.main(train_ablations.Args(sizes=("tiny",), batch=2, repeats=1))
    lines = ratio_lines(capsys.readouterr().out)
    for variant in ("full-square", "remat-dots", "no-remat"):
        assert any(f"speed-up over {variant}" in line for line in lines), (variant, lines)


def test_compile_time_prints_its_ratios(capsys):
    compile_time.main(compile_time.Args(model="tiny", steady=1))
    lines = ratio_lines(capsys.readouterr().out)
    assert any("unrolled/scan time to first step" in line for line in lines), lines
    assert any("scan/unrolled steady" in line for line in lines), lines


def test_gpu_script_runs_tiny_on_cpu(capsys):
    gpu.main(gpu.Args(tiny=True))
    lines = ratio_lines(capsys.readouterr().out)
    assert any("train MFU (of the measured bf16 matmul rate)" in line for line in lines), lines
    assert any("decode steps/s of the weight-read bound" in line for line in lines), lines


@pytest.mark.parametrize("prepared", [False, True])
def test_generate_prints_a_row_per_setting(capsys, prepared):
    generate.main(generate.Args(models=("small",), new_tokens=3, repeats=1, prepared=prepared))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("small ")]
    assert len(rows) == 3, rows  # batch 1 greedy, batch 16 greedy, batch 1 top-p
    assert all(re.search(r"\d+\.\d\dx \|", row) for row in rows), rows  # the speed-up
    assert re.search(r"\d+%$", rows[0]) and rows[1].endswith("-"), rows  # % of bound at batch 1 only


def test_decode_ceiling_prints_its_ratios(capsys):
    decode_ceiling.main(decode_ceiling.Args(steps=2, repeats=1, layers=2, width=32, vocab=64))
    lines = ratio_lines(capsys.readouterr().out)
    for wanted in ("(in, out)", "(out, in)", "head alone"):
        assert any(line.startswith(wanted) and "of copy bandwidth" in line for line in lines), (wanted, lines)


@pytest.mark.parametrize(
    "main, args",
    [
        (train_speed.main, train_speed.Args(sizes=("huge",))),
        (train_speed.main, train_speed.Args(sizes=("tiny",), batch=0)),
        (compile_time.main, compile_time.Args(model="gpt5")),
        (compile_time.main, compile_time.Args(model="tiny", seq=33)),
        (gpu.main, gpu.Args(batch=0)),
        (decode_ceiling.main, decode_ceiling.Args(width=0)),
        (train_ablations.main, train_ablations.Args(sizes=("huge",))),
        (generate.main, generate.Args(models=("gpt5",))),
        (generate.main, generate.Args(new_tokens=1)),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, main, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err


def test_interleaved_alternates_and_reports_medians():
    calls = []
    seconds = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(seconds) == {"a", "b"} and all(t >= 0 for t in seconds.values())

