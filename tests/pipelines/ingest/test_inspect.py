"""`darkmatter inspect` on a generated corpus with bad files, through the real CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from ingest_files import bad_files  # noqa: E402


def test_inspect_json_bad_list_and_exit_codes(ray_session, sample_dir, tmp_path, capsys):
    images = pq.read_table(sample_dir / "test.parquet").column("image").to_pylist()[:20]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, data in enumerate(images):
        (corpus / f"{i}.jpg").write_bytes(data)
    for name, data in bad_files().items():
        (corpus / name).write_bytes(data)
    bad_list = tmp_path / "bad.tsv"
    code = main(["inspect", str(corpus), "--json", "--bad-list", str(bad_list), "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert summary["files"] == 24 and summary["decoded"] == 20 and summary["skipped"] == 4
    assert summary["skipped_by_reason"] == {
        "empty": 1, "not_an_image": 1, "too_many_pixels": 1, "truncated": 1,
    }  # fmt: skip
    assert summary["by_format"] == {"JPEG": 20} and summary["width"]["max"] == 32
    lines = bad_list.read_text().splitlines()
    assert len(lines) == 4 and all(line.split("\t")[1] for line in lines)

    code = main(["inspect", str(corpus), "--show", "2", "--no-progress"])
    assert code == 0 and "first 2 of 4 skipped" in capsys.readouterr().out

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"")
    assert main(["inspect", str(only_bad), "--json", "--no-progress"]) == 1
