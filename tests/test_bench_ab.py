"""benchmarks/ab.py on CPU: its cases, a quick run through the public op, and the comparison."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ab.py"


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("benchmarks_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_only_the_public_op_is_used():
    """An old checkout must run it: flashjax is imported whole and only its op (and its file, for
    the commit) is read."""
    tree = ast.parse(SCRIPT.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    from_flashjax = [n for n in imports if isinstance(n, ast.ImportFrom) and "flashjax" in n.module]
    assert not from_flashjax
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "flashjax"
    }
    assert used == {"dot_product_attention", "__file__"}


def test_cases_of_the_brief(ab):
    cases = ab.full_cases()
    dense = [c for c in cases if c.group == "dense"]
    assert len(dense) == 18 and {c.batch * c.seq for c in dense} == {16384}
    assert {c.heads * c.head_dim for c in dense} == {2048}
    padding = [c for c in cases if c.group == "padding"]
    assert [(c.batch, c.seq, c.heads, c.head_dim, c.causal) for c in padding] == [
        (8, 4096, 16, 128, False),
        (8, 4096, 16, 128, True),
    ]
    packed = [c for c in cases if c.group == "packed"]
    assert [(c.batch, c.seq, c.causal, c.documents) for c in packed] == [
        (4, 8192, True, 8),
        (4, 8192, True, 16),
    ]
    assert len({c.name for c in cases}) == len(cases)


def test_lengths_and_documents_are_seeded(ab):
    case = ab.Case("padding", 8, 4096, 16, 128, False, padded=True)
    lengths = ab.kv_lengths(case, 0)
    assert lengths.dtype == np.int32 and ((lengths >= 1024) & (lengths <= 4096)).all()
    assert (ab.kv_lengths(case, 0) == lengths).all()
    docs = ab.Case("packed", 4, 8192, 16, 128, True, documents=16)
    ids = ab.segment_ids(docs, 0)
    assert ids.shape == (4, 8192) and ids.dtype == np.int32
    assert (np.diff(ids, axis=1) >= 0).all()  # sorted
    assert all(len(np.unique(row)) == 16 for row in ids)
    assert (ab.segment_ids(docs, 0) == ids).all() and not (ab.segment_ids(docs, 1) == ids).all()


def test_quick_run_and_compare(ab, tmp_path, capsys):
    assert ab.main(["--quick", "--label", "new", "--out", str(tmp_path), "--reps", "2"]) == 0
    new = json.loads((tmp_path / "ab-new.json").read_text())
    assert new["implementation"] == "xla_chunked" and new["platform"] == "cpu"
    assert new["commit"] != "" and new["jax_version"]
    names = [c["name"] for c in new["cases"]]
    assert names == [c.name for c in ab.quick_cases()]
    for row in new["cases"]:
        assert row["status"] == "ok", row["error"]
        ms = row["ms"]
        assert ms["fwd"] > 0 and ms["fwd+bwd"] > 0
        assert ms["bwd"] == pytest.approx(ms["fwd+bwd"] - ms["fwd"])

    # Compare on fixed times (on a loaded CPU the measured bwd, a difference of two medians,
    # can come out <= 0, which the comparison reports as n/a): an "old" run 10% faster
    # everywhere but one case, which is 20% slower.
    for i, row in enumerate(new["cases"]):
        row["ms"] = {"fwd": 1.0 + i, "fwd+bwd": 3.0 + 2 * i, "bwd": 2.0 + i}
    (tmp_path / "ab-new.json").write_text(json.dumps(new))
    old = json.loads(json.dumps(new)) | {"label": "old", "commit": "d7eec2a"}
    for row in old["cases"]:
        row["ms"] = {m: v / 1.1 for m, v in row["ms"].items()}
    old["cases"][0]["ms"] = {m: v * 1.2 for m, v in new["cases"][0]["ms"].items()}
    (tmp_path / "ab-old.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert ab.main(["--compare", str(tmp_path / "ab-old.json"), str(tmp_path / "ab-new.json")]) == 0
    text = (tmp_path / "ab-compare.md").read_text()
    assert text == capsys.readouterr().out.split("\nwrote ")[0]
    lines = [line for line in text.splitlines() if line.startswith("| " + names[0])]
    assert len(lines) == 3 and all("| faster |" in line for line in lines)
    assert text.count("| REGRESSION |") == 3 * (len(names) - 1)
    assert "1.100" in text and f"{3 * (len(names) - 1)} regression(s)" in text


def test_flags(ab):
    assert ab.flag(1.031) == "REGRESSION" and ab.flag(1.029) == ""
    assert ab.flag(0.96) == "faster" and ab.flag(None) == "n/a"
