"""The report.md of a bench that prints its tables: its title, its command, commit and machine,
then what it printed."""

from __future__ import annotations

import re

import pytest

from fusion.bench import _quality_report as report_lib

PRINTED = [
    "vocab     64  sft                   1.0 MiB",
    "",
    "Peak memory (batch 2):",
    "| vocabulary | sft MiB |",
    "|---|---|",
    "| 64 | 1 |",
]


def test_printed_report_opens_with_provenance_and_keeps_the_tables(tmp_path, capsys):
    with report_lib.printed_report("python -m fusion.bench memory", ["--vocab", "64"], "Peak memory") as report:
        report["output"] = str(tmp_path / "memory")
        for line in PRINTED:
            print(line)

    assert capsys.readouterr().out == "\n".join(PRINTED) + "\n"  # printed as before
    origin = report["provenance"]
    assert origin["command"] == "python -m fusion.bench memory --vocab 64"
    assert re.fullmatch(r"([0-9a-f]{7,}(\+changes)?|unknown)", origin["commit"])
    assert re.fullmatch(r".+, \d+ CPUs, Python [\d.]+, torch .+", origin["machine"])
    assert (tmp_path / "memory" / "report.md").read_text() == (
        "# Peak memory\n\n"
        f"`python -m fusion.bench memory --vocab 64` at commit `{origin['commit']}`, on {origin['machine']}.\n\n"
        "```text\nvocab     64  sft                   1.0 MiB\n\nPeak memory (batch 2):\n```\n\n"  # text as printed
        "| vocabulary | sft MiB |\n|---|---|\n| 64 | 1 |\n"  # a Markdown table as a table
    )


def test_printed_report_writes_nothing_when_the_bench_fails(tmp_path):
    with pytest.raises(RuntimeError), report_lib.printed_report("python -m fusion.bench throughput", [], "Speed") as report:
        report["output"] = str(tmp_path)
        print("| method | steps/s |")
        raise RuntimeError("a step failed")
    assert not (tmp_path / "report.md").exists()
